"""export_problems and check_exportable: export failures named at the module and line, outputs
compared with eager leaf by leaf, dynamic sizes run at a second size."""

from __future__ import annotations

import importlib.util
import inspect
from typing import Any

import pytest
import torch
from torch import nn

from pytest_modelhooks import HealthError
from pytest_modelhooks.compile.export import check_exportable, export_problems
from tests import zoo
from tests.helpers import untouched


class Branch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # EXPORT: branch
            return x * 2
        return x


class Selected(nn.Module):
    """nonzero without a size hint, then a Python check of how many it found."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        where = torch.nonzero(x > 0)
        if where.shape[0] > 3:  # EXPORT: nonzero
            return x[where[:, 0], where[:, 1]].sum() * torch.ones_like(x)
        return x


class SizeSwitch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 3:  # EXPORT: specialise
            return x
        return x * 2


class Holder(nn.Module):
    def __init__(self, child: nn.Module) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.child = child

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.child(self.pre(x))


class Heads(nn.Module):
    """A dict output; with ``drift`` its "scores" head differs only under export."""

    def __init__(self, drift: bool = False) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.3)
        self.drift = drift
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not torch.compiler.is_exporting():
            self.batches.append(x.shape[0])
        h = self.drop(self.norm(self.body(x)))
        scores = h.softmax(-1)
        if self.drift and torch.compiler.is_exporting():
            scores = scores + 1e-3
        return {"features": h, "scores": scores}


def _line(marker: str) -> int:
    source, _ = inspect.getsourcelines(inspect.getmodule(_line))  # type: ignore[arg-type]
    return next(index + 1 for index, text in enumerate(source) if f"# EXPORT: {marker}" in text)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize(
    ("child", "marker", "words"),
    [(Branch(), "branch", "branch"), (Selected(), "nonzero", "data-dependent")],
    ids=["branch", "nonzero"],
)
def test_an_export_failure_is_named_at_its_module_and_line(
    child: nn.Module, marker: str, words: str, strict: bool
) -> None:
    model = Holder(child)
    with untouched(model):
        (finding,) = export_problems(model, torch.randn(3, 4), strict=strict)
    assert (finding.layer, finding.layer_type, finding.statistic) == (
        "child",
        type(child).__name__,
        "not exportable",
    )
    assert f"test_export.py:{_line(marker)}" in finding.note
    assert words in finding.note.lower()
    assert "hint:" in finding.note
    with pytest.raises(HealthError, match=r"torch\.export check failed: 1 problem"):
        check_exportable(model, torch.randn(3, 4), strict=strict)


def test_a_dynamic_batch_the_code_specialises_is_named_at_its_line() -> None:
    (finding,) = export_problems(Holder(SizeSwitch()), torch.randn(3, 4), dynamic_shapes="batch")
    assert (finding.layer, finding.statistic) == ("child", "specialized")
    assert f"test_export.py:{_line('specialise')}" in finding.note
    assert "specialized it to be a constant (3)" in finding.note


def test_a_dict_output_is_compared_leaf_by_leaf() -> None:
    healthy = Heads()
    with untouched(healthy):
        assert export_problems(healthy, torch.randn(4, 4)) == []  # training mode: dropout and batch norm
    (finding,) = export_problems(Heads(drift=True).eval(), torch.randn(4, 4))
    assert (finding.layer, finding.statistic) == ("output.scores", "max |diff|")
    assert finding.observed == pytest.approx(1e-3, rel=1e-3)
    assert "32 of 32 values beyond tolerance" in finding.note
    assert export_problems(Heads(drift=True).eval(), torch.randn(4, 4), atol=2e-3) == []


def test_a_dynamic_batch_exports_and_runs_at_two_sizes() -> None:
    model = Heads().eval()
    assert export_problems(model, torch.randn(3, 4), dynamic_shapes="batch") == []
    assert model.batches == [3, 6]  # eager at the size given and at twice it, each compared
    model.batches.clear()
    batch = torch.export.Dim("batch", min=2, max=4)
    assert export_problems(model, torch.randn(3, 4), dynamic_shapes={"x": {0: batch}}) == []
    assert model.batches == [3, 4]  # twice 3 is past the range: the largest size within it


@pytest.mark.parametrize("name", ["resnetish", "transformer", "tied_lm", "tuple_out", "mixed_modes"])
def test_standard_architectures_export_and_agree_with_eager(name: str) -> None:
    model, batch = zoo.build(name)
    with untouched(model):
        assert export_problems(model, batch, dynamic_shapes="batch") == []


def test_an_output_export_cannot_flatten_is_named() -> None:
    model, batch = zoo.build("dataclass_out")
    (finding,) = export_problems(model, batch)
    assert finding.statistic == "not exportable"
    assert "the output holds a tests.zoo.Output, which torch.export cannot take apart" in finding.note
    assert "(hint: register the class as a pytree node (torch.export.register_dataclass" in finding.note


def test_a_transformers_cache_in_the_output_says_to_turn_it_off() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=50, n_positions=16)
    model, ids = transformers.GPT2LMHeadModel(config).eval(), torch.randint(0, 50, (2, 8))
    (finding,) = export_problems(model, ids)
    assert "holds a transformers.cache_utils.DynamicCache" in finding.note
    assert (
        "(hint: a transformers model returns its key/value cache there: pass use_cache=False)" in finding.note
    )
    assert export_problems(model, ids, use_cache=False) == []


def test_the_rng_and_the_models_buffers_are_left_as_found() -> None:
    model = Heads()  # training mode: batch norm updates its running statistics on each run
    batch = torch.randn(4, 4)
    state = torch.random.get_rng_state()
    with untouched(model):
        export_problems(model, batch, dynamic_shapes="batch")
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        (
            {"dynamic_shapes": {"y": {0: None}}},
            ValueError,
            "dynamic_shapes names 'y', which is no input given",
        ),
        (
            {"dynamic_shapes": ({0: None}, {0: None})},
            ValueError,
            r"dynamic_shapes has 2 entries for 1 input\(s\)",
        ),
        ({"dynamic_shapes": 5}, ValueError, "dynamic_shapes must be None, 'batch', a dict"),
        ({"to": "tflite"}, ValueError, "to must be one of 'torch', 'onnx', got to='tflite'"),
        ({"rtol": -1.0}, ValueError, "rtol must be a non-negative number or None, got rtol=-1.0"),
    ],
)
def test_bad_options_are_refused_naming_the_argument(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        export_problems(Heads(), torch.randn(4, 4), **options)


def test_inputs_that_do_not_fit_are_named() -> None:
    with pytest.raises(ValueError, match=r"inputs \(x \(4, 3\)\) do not fit Heads.forward"):
        export_problems(Heads(), torch.randn(4, 3))
    with pytest.raises(ValueError, match="dynamic_shapes='batch' needs a batch of 2 or more"):
        export_problems(Heads(), torch.randn(1, 4), dynamic_shapes="batch")


def test_onnx_asked_for_without_onnx_installed_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name)
    )
    with pytest.raises(
        ImportError, match=r"to='onnx' needs (.*, )?onnxruntime, not installed.*pytest-modelhooks\[onnx\]"
    ):
        export_problems(Heads(), torch.randn(4, 4), to="onnx")


onnx_installed = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not onnx_installed, reason="the onnx extra is not installed")


@needs_onnx
def test_onnx_export_agrees_with_eager_through_onnxruntime() -> None:
    model = Heads().eval()
    with untouched(model):
        assert export_problems(model, torch.randn(3, 4), to="onnx", dynamic_shapes="batch") == []
    assert model.batches == [3, 6]
    (finding,) = export_problems(Heads(drift=True).eval(), torch.randn(3, 4), to="onnx")
    assert (finding.layer, finding.statistic) == ("output.scores", "max |diff|")
    assert "ONNX model (onnxruntime)" in finding.note


@needs_onnx
def test_onnx_of_a_model_in_training_mode_is_a_finding_naming_the_layers() -> None:
    (finding,) = export_problems(Heads(), torch.randn(3, 4), to="onnx")
    assert (finding.statistic, finding.observed) == ("training mode", 2)
    assert "norm (BatchNorm1d), drop (Dropout)" in finding.note and "model.eval()" in finding.note


@needs_onnx
def test_an_onnx_export_failure_is_named_at_its_module_and_line() -> None:
    (finding,) = export_problems(Holder(Branch()), torch.randn(3, 4), to="onnx")
    assert (finding.layer, finding.statistic) == ("child", "not exportable")
    assert f"test_export.py:{_line('branch')}" in finding.note
