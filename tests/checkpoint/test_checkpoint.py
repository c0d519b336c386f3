"""state_dict_spec, load_problems and check_loads: each refactor that breaks old checkpoints is
named in load_state_dict's words, checked against what load_state_dict itself does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pytest_modelhooks import HealthError
from pytest_modelhooks.checkpoint import (
    StateDictSpec,
    check_loads,
    load_problems,
    read_checkpoint,
    state_dict_spec,
)
from tests import zoo


class Encoder(nn.Module):
    def __init__(self, width: int = 64, norm_name: str = "norm", persistent: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(32, width)
        setattr(self, norm_name, nn.LayerNorm(width))
        self.register_buffer("scale", torch.ones(width), persistent=persistent)
        self.norm_name = norm_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.norm_name)(self.proj(x)) * self.scale


class Net(nn.Module):
    def __init__(self, tie: bool = True, **encoder: object) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 64)
        self.encoder = Encoder(**encoder)  # type: ignore[arg-type]
        self.head = nn.Linear(64, 100, bias=False)
        if tie:
            self.head.weight = self.embed.weight


def _strict_error(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    with pytest.raises(RuntimeError) as raised:
        model.load_state_dict(state, strict=True)
    return str(raised.value)


def test_the_spec_lists_every_key_with_kind_shape_dtype_persistence_and_tie() -> None:
    spec = state_dict_spec(Net(persistent=False))
    assert [entry.key for entry in spec.persistent] == list(Net(persistent=False).state_dict())
    assert spec["head.weight"].tied_to == "embed.weight" and spec["embed.weight"].tied_to is None
    assert spec["encoder.scale"].kind == "buffer" and not spec["encoder.scale"].persistent
    assert spec["encoder.proj.weight"].shape == (64, 32) and spec["encoder.proj.weight"].dtype == "float32"
    text = str(spec)
    assert text.startswith("State dict: 6 keys, ")
    assert "tied to embed.weight" in text and "not persistent: not saved" in text
    assert StateDictSpec.from_text(text) == spec
    assert StateDictSpec.from_json(spec.to_json()) == spec


def test_a_renamed_submodule_is_missing_and_unexpected_with_the_rename_suggested() -> None:
    old, new = Net(norm_name="ln"), Net(norm_name="norm")
    found = load_problems(new, old.state_dict())
    assert [(f.layer, f.statistic) for f in found] == [
        ("encoder.norm.weight", "missing"),
        ("encoder.norm.bias", "missing"),
        ("encoder.ln.weight", "unexpected"),
        ("encoder.ln.bias", "unexpected"),
    ]
    assert "missing: encoder.norm.weight (64,)" in found[0].note
    assert "renamed? the checkpoint has encoder.ln.weight" in found[0].note
    assert "renamed to encoder.norm.weight?" in found[2].note
    error = _strict_error(new, old.state_dict())  # what torch says, for the same keys
    assert '"encoder.norm.weight"' in error and '"encoder.ln.weight"' in error


def test_a_width_change_is_a_shape_row_strict_or_not() -> None:
    old, new = Net(), Net()
    new.encoder.proj = nn.Linear(32, 48)  # the projection narrowed; the norm after it is not
    for strict in (True, False):
        found = load_problems(new, old.state_dict(), strict=strict)
        rows = [(f.layer, f.statistic) for f in found]
        assert rows == [("encoder.proj.weight", "shape"), ("encoder.proj.bias", "shape")]
    assert "shape: encoder.proj.weight (64, 32) in the checkpoint -> (48, 32) in the model" in found[0].note
    with pytest.raises(RuntimeError, match=r"size mismatch for encoder\.proj\.weight"):
        new.load_state_dict(old.state_dict(), strict=False)


def test_a_buffer_made_non_persistent_is_unexpected_and_says_so() -> None:
    old, new = Net(), Net(persistent=False)
    (finding,) = load_problems(new, old.state_dict())
    assert (finding.layer, finding.statistic) == ("encoder.scale", "unexpected")
    assert "not persistent now" in finding.note
    assert '"encoder.scale"' in _strict_error(new, old.state_dict())


def test_a_tied_weight_untied_and_the_other_way(tmp_path: Path) -> None:
    tied, apart = Net(tie=True), Net(tie=False)
    path = tmp_path / "tied.pt"
    torch.save(tied.state_dict(), path)  # torch.save keeps the tie: one storage, two keys
    (untied,) = load_problems(apart, path)
    assert (untied.layer, untied.statistic) == ("head.weight", "untied")
    assert "tied to embed.weight" in untied.note
    (retied,) = load_problems(tied, apart.state_dict())
    assert (retied.layer, retied.statistic) == ("head.weight", "tied")
    assert load_problems(tied, path) == [] and load_problems(apart, apart.state_dict()) == []


def test_strict_false_reports_what_would_be_silently_skipped() -> None:
    old, new = Net(norm_name="ln"), Net(norm_name="norm")
    found = load_problems(new, old.state_dict(), strict=False)
    assert "silently skipped: it keeps its initial values" in found[0].note
    assert "silently ignored" in found[2].note
    result = new.load_state_dict(old.state_dict(), strict=False)  # torch agrees, without a word
    assert set(result.missing_keys) == {f.layer for f in found if f.statistic == "missing"}
    assert set(result.unexpected_keys) == {f.layer for f in found if f.statistic == "unexpected"}


def test_a_dtype_change_loads_cast_and_is_named_unless_allowed() -> None:
    old, new = Net(tie=False), Net(tie=False)
    state = old.state_dict()
    half = {key: value.half() if value.is_floating_point() else value for key, value in state.items()}
    found = load_problems(new, half)
    assert {f.statistic for f in found} == {"dtype"}
    assert "float16 in the checkpoint -> float32" in found[0].note
    assert load_problems(new, half, allow_cast=True) == []
    # a tied model's weights cast one by one come apart: loading them writes one tensor twice
    tied = {key: value.half() for key, value in Net().state_dict().items() if value.is_floating_point()}
    assert "tied" in {f.statistic for f in load_problems(Net(), tied, allow_cast=True)}


def test_a_wrapper_prefix_on_every_key_is_one_row() -> None:
    model = Net()
    wrapped = {f"module.{key}": value for key, value in model.state_dict().items()}
    (finding,) = load_problems(model, wrapped)
    assert (
        finding.statistic == "prefix"
        and "'module.'" in finding.note
        and "DistributedDataParallel" in finding.note
    )
    compiled = {f"_orig_mod.{key}": value for key, value in model.state_dict().items()}
    assert "torch.compile" in load_problems(model, compiled)[0].note


def test_checkpoint_files_nested_dicts_safetensors_and_specs(tmp_path: Path) -> None:
    model, _ = zoo.build("resnetish")
    path = tmp_path / "epoch3.pt"
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 3}, path)
    check_loads(model, path)  # found under "model"
    check_loads(model, path, key="model")
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(state_dict_spec(model).to_json())
    check_loads(model, spec_file)
    check_loads(model, state_dict_spec(model))
    safetensors = pytest.importorskip("safetensors.torch")
    file = tmp_path / "model.safetensors"
    safetensors.save_file(model.state_dict(), str(file))
    assert read_checkpoint(file)["stem.0.weight"].shape == tuple(model.stem[0].weight.shape)
    check_loads(model, file)


def test_check_loads_fails_with_a_row_per_key() -> None:
    with pytest.raises(
        HealthError, match=r"checkpoint check failed \(strict=True\): 2 missing, 2 unexpected"
    ):
        check_loads(Net(norm_name="norm"), Net(norm_name="ln").state_dict())


def test_a_meta_model_is_read_without_weights() -> None:
    with torch.device("meta"):
        big = nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(8)])
    spec = state_dict_spec(big)
    assert spec.values() == 8 * (4096 * 4096 + 4096)


def test_bad_checkpoints_are_refused_naming_the_argument(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"checkpoint '.*nowhere\.pt': no such file"):
        load_problems(Net(), tmp_path / "nowhere.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"does not load with torch\.load"):
        load_problems(Net(), garbage)
    with pytest.raises(TypeError, match="checkpoint must be a state dict, a path"):
        load_problems(Net(), 42)
    with pytest.raises(ValueError, match="holds no tensors at its top level"):
        load_problems(Net(), {"epoch": 3, "config": {"lr": 0.1}})
    with pytest.raises(KeyError, match="no state dict at key='ema'"):
        load_problems(Net(), {"model": Net().state_dict()}, key="ema")


def test_a_spec_snapshot_diff_reads_as_loading_an_old_checkpoint() -> None:
    from pytest_modelhooks.report.text import snapshot_text
    from pytest_modelhooks.snapshot import change_report

    old = snapshot_text(state_dict_spec(Net(norm_name="ln")))
    widened = Net(norm_name="norm", persistent=False)
    widened.head = nn.Linear(64, 200, bias=False)  # a wider head, no longer tied
    report = change_report(old, snapshot_text(state_dict_spec(widened)))
    assert report[0].startswith("A checkpoint of the snapshot's model, loaded now: ")
    assert "  missing: encoder.norm.weight (64,) (renamed from encoder.ln.weight?)" in report
    assert "  unexpected: encoder.ln.bias (64,)" in report
    assert "  unexpected: encoder.scale (64,)" in report  # the buffer made non-persistent
    assert "  shape: head.weight (100, 64) -> (200, 64)" in report
    assert "  untied: head.weight was tied to embed.weight" in report
    assert change_report(old, old) == []
