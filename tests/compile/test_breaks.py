"""graph_breaks and check_compiles: planted breaks named at their module and line."""

from __future__ import annotations

import inspect
import zlib

import pytest
import torch
from torch import nn

from pytest_modelhooks import HealthError
from pytest_modelhooks.compile import check_compiles, graph_breaks
from tests import zoo
from tests.helpers import untouched


class Item(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * x.sum().item()  # BREAK: item


class Printing(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        print("shape", x.shape)  # BREAK: print
        return x + 1


class ToList(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + len([v for v in x.flatten().tolist() if v > 0])  # BREAK: tolist


class Builtin(nn.Module):
    """A C builtin dynamo cannot trace, before any op: explain lists no break, dynamo counts one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + zlib.crc32(b"modelhooks") % 7  # BREAK: builtin


class Branch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # BREAK: branch
            return x * 2
        return x


class Holder(nn.Module):
    """A model whose child breaks; the child is called through an attribute."""

    def __init__(self, child: nn.Module) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.child = child

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.child(self.pre(x))


class OwnCode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        if y.mean() > 0:  # BREAK: own
            y = y * 2
        return y


def _line(marker: str) -> int:
    source, _ = inspect.getsourcelines(inspect.getmodule(_line))  # type: ignore[arg-type]
    return next(index + 1 for index, text in enumerate(source) if f"# BREAK: {marker}" in text)


@pytest.mark.parametrize(
    ("child", "marker", "words"),
    [
        (Item(), "item", "item()"),
        (Printing(), "print", "print"),
        (ToList(), "tolist", "tolist()"),
        (Branch(), "branch", "branch"),
        (Builtin(), "builtin", "zlib.crc32"),
    ],
    ids=["item", "print", "tolist", "branch", "builtin"],
)
def test_a_planted_break_is_named_at_its_module_and_line(child: nn.Module, marker: str, words: str) -> None:
    model = Holder(child)
    with untouched(model):
        (finding,) = graph_breaks(model, torch.randn(2, 4))
    assert (finding.layer, finding.layer_type, finding.statistic) == (
        "child",
        type(child).__name__,
        "graph break",
    )
    assert finding.observed >= 1  # dynamo's count: the caller's graph splits at the call too
    assert f"test_breaks.py:{_line(marker)}" in finding.note
    assert words in finding.note.lower()


def test_a_break_before_any_op_is_found_though_explain_lists_none() -> None:
    (finding,) = graph_breaks(Builtin(), torch.randn(2, 4))
    assert (finding.layer, finding.layer_type, finding.observed) == ("", "Builtin", 1)
    assert f"test_breaks.py:{_line('builtin')}" in finding.note and "zlib.crc32" in finding.note
    with pytest.raises(HealthError, match="1 graph break"):
        check_compiles(Builtin(), torch.randn(2, 4))


def test_the_hint_of_dynamo_comes_with_the_reason() -> None:
    (finding,) = graph_breaks(Holder(Item()), torch.randn(2, 4))
    assert "capture_scalar_outputs" in finding.note


def test_a_break_in_the_models_own_forward_is_named_as_the_model() -> None:
    (finding,) = graph_breaks(OwnCode(), torch.randn(2, 4))
    assert (finding.layer, finding.layer_type) == ("", "OwnCode")
    assert f":{_line('own')} " in finding.note


@pytest.mark.parametrize("name", ["resnetish", "unet", "transformer", "tied_lm"])
def test_standard_architectures_compile_without_a_break(name: str) -> None:
    model, batch = zoo.build(name)
    with untouched(model):
        assert graph_breaks(model, batch) == []
        check_compiles(model, batch)


def test_check_compiles_fails_over_the_allowance_and_names_each_place() -> None:
    model = Holder(Branch())
    with pytest.raises(HealthError, match=r"graph break\(s\), 0 allowed, in 1 place") as raised:
        check_compiles(model, torch.randn(2, 4))
    assert raised.value.findings[0].layer == "child"
    allowed = int(raised.value.findings[0].observed)
    check_compiles(model, torch.randn(2, 4), max_graph_breaks=allowed)
    with pytest.raises(
        ValueError, match="max_graph_breaks must be a non-negative int, got max_graph_breaks=-1"
    ):
        check_compiles(model, torch.randn(2, 4), max_graph_breaks=-1)


class Twice(nn.Module):
    """One module called twice: its break is one place."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = Branch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(self.shared(x))


class Stack(nn.Module):
    """Blocks called through a loop variable: the break is placed at every instance."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Branch(), Branch()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_a_module_called_twice_is_one_place() -> None:
    (finding,) = graph_breaks(Twice(), torch.randn(2, 4))
    assert (finding.layer, finding.layer_type) == ("shared", "Branch")


def test_blocks_called_through_a_loop_variable_are_all_named() -> None:
    (finding,) = graph_breaks(Stack(), torch.randn(2, 4))
    assert (finding.layer, finding.layer_type) == ("blocks.0, blocks.1", "Branch")


def test_a_forward_dynamo_skips_whole_fails_instead_of_passing() -> None:
    """dynamo does not trace RNNs by default: nothing is compiled, which is no pass."""
    model, batch = zoo.build("gru")
    (finding,) = graph_breaks(model, batch)
    assert (finding.layer, finding.statistic) == ("", "not compiled")
    assert "allow_rnn" in finding.note
    with pytest.raises(HealthError, match="not compiled"):
        check_compiles(model, batch)
