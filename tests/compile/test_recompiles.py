"""recompiles and check_compiles over several inputs: each recompilation named with its call,
the guard that failed and the module whose code it guards."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch._dynamo
from torch import nn

from pytest_modelhooks import HealthError
from pytest_modelhooks.compile import check_compiles, graph_breaks, recompiles
from tests import zoo
from tests.helpers import untouched


class SizeSwitch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 5:  # SPECIALISES
            return self.proj(x) * 2
        return self.proj(x)


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.switch = SizeSwitch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.switch(self.pre(x))


def _line(marker: str) -> int:
    source, _ = inspect.getsourcelines(inspect.getmodule(_line))  # type: ignore[arg-type]
    return next(index + 1 for index, text in enumerate(source) if f"# {marker}" in text)


def _batches(*sizes: int) -> list[torch.Tensor]:
    return [torch.randn(size, 4) for size in sizes]


def test_a_new_batch_size_recompiles_once_with_the_guard_and_the_hint() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with untouched(model):
        (finding,) = recompiles(model, *_batches(2, 5, 7))  # automatic dynamic: 7 reuses 5's graph
    assert (finding.statistic, finding.batch) == ("recompile", 1)
    assert "(5, 4)" in finding.note
    assert "size mismatch at index 0. expected 2, actual 5" in finding.note
    assert "dynamic='batch'" in finding.note


def test_the_batch_marked_dynamic_compiles_once_for_every_size() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert recompiles(model, *_batches(2, 5, 7), dynamic="batch") == []
    check_compiles(model, *_batches(2), more_inputs=_batches(5, 7), dynamic="batch", max_recompiles=0)


def test_sequence_lengths_marked_dynamic_compile_once() -> None:
    model, _ = zoo.build("tied_lm")
    calls = [torch.randint(0, 100, (2, length)) for length in (7, 16)]
    assert len(recompiles(model, *calls)) == 1
    assert recompiles(model, *calls, dynamic={"tokens": 1}) == []
    (static,) = recompiles(model, *calls, dynamic=False)
    assert "index 1. expected 7, actual 16" in static.note
    assert "dynamic={'tokens': 1}" in static.note


def test_a_batch_marked_dynamic_that_the_code_specialises_is_named_at_its_line() -> None:
    model = Outer()
    with untouched(model):
        (finding,) = recompiles(model, *_batches(2, 5), dynamic="batch")
    assert (finding.layer, finding.layer_type, finding.statistic) == ("switch", "SizeSwitch", "specialized")
    assert f"test_recompiles.py:{_line('SPECIALISES')}" in finding.note
    assert "specialized it to be a constant (5)" in finding.note
    with pytest.raises(HealthError, match="specialized") as raised:
        check_compiles(model, *_batches(2), more_inputs=_batches(5), dynamic="batch")
    assert raised.value.findings[-1].layer == "switch"
    (alone,) = graph_breaks(model, torch.randn(5, 4), dynamic="batch")
    assert alone.statistic == "specialized"


def test_every_size_dynamic_still_recompiles_where_the_code_reads_a_size() -> None:
    (finding,) = recompiles(Outer(), *_batches(2, 5), dynamic=True)
    assert (finding.layer, finding.statistic, finding.batch) == ("switch", "recompile", 1)
    assert f"test_recompiles.py:{_line('SPECIALISES')} `if x.shape[0] == 5:" in finding.note
    assert "x.size()[0] != 5" in finding.note
    with pytest.raises(HealthError, match=r"1 recompile\(s\), 0 allowed"):
        check_compiles(Outer(), *_batches(2), more_inputs=_batches(5), dynamic=True, max_recompiles=0)
    check_compiles(Outer(), *_batches(2), more_inputs=_batches(5), dynamic=True)  # not bounded


def test_past_the_recompile_limit_dynamo_gives_up_and_the_check_fails() -> None:
    model = nn.Linear(4, 4)
    sizes = range(1, torch._dynamo.config.recompile_limit + 3)
    found = recompiles(model, *_batches(*sizes), dynamic=False)
    assert sum(f.statistic == "recompile" for f in found) == torch._dynamo.config.recompile_limit - 1
    (limit,) = [f for f in found if f.statistic == "recompile limit"]
    assert limit.batch == torch._dynamo.config.recompile_limit
    assert "recompile_limit" in limit.note
    with pytest.raises(HealthError, match="recompile limit"):
        check_compiles(model, *_batches(1), more_inputs=_batches(*sizes[1:]), dynamic=False)


def test_inputs_model_and_dynamo_config_are_left_as_found() -> None:
    model = Outer()
    calls = _batches(2, 5)
    config = torch._dynamo.config.get_config_copy()
    with untouched(model):
        recompiles(model, *calls, dynamic="batch")
        recompiles(model, *calls, dynamic=True)
        graph_breaks(model, calls[0], dynamic={"x": 0})
    assert all(vars(call) == {} for call in calls)
    assert torch._dynamo.config.get_config_copy() == config


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.calls: list[float] = []

    def forward(self, x: torch.Tensor, mask: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        self.calls.append(scale)
        return self.proj(x) * mask * scale


def test_keyword_inputs_and_forward_kwargs_reach_every_call() -> None:
    model = Scaled()
    calls = [(torch.randn(2, 4), torch.ones(2, 1)), {"x": torch.randn(3, 4), "mask": torch.ones(3, 1)}]
    (finding,) = recompiles(model, *calls, scale=3.0)
    assert finding.batch == 1 and "x (3, 4), mask (3, 1)" in finding.note
    assert model.calls and set(model.calls) == {3.0}  # the forward saw scale=3.0 every call


@pytest.mark.parametrize(
    ("dynamic", "message"),
    [
        ("sometimes", "dynamic must be None, True, False, 'batch' or a mapping"),
        ({"y": 0}, "dynamic names 'y', which is no input of this call"),
        ({"x": 2}, r"the input has shape \(2, 4\), no dimension 2"),
        ({0: "zero"}, r"dynamic\[0\] must be a dimension or a sequence of them"),
    ],
)
def test_a_dynamic_that_names_no_input_is_refused(dynamic: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        recompiles(Outer(), *_batches(2, 5), dynamic=dynamic)  # type: ignore[arg-type]


def test_inputs_that_do_not_fit_are_named() -> None:
    with pytest.raises(ValueError, match=r"calls\[1\] \(x \(2, 3\)\) do not fit Outer.forward"):
        recompiles(Outer(), torch.randn(2, 4), torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"inputs \(x \(2, 3\)\) do not fit Outer.forward"):
        graph_breaks(Outer(), torch.randn(2, 3))
    with pytest.raises(ValueError, match="needs the inputs of one call or more"):
        recompiles(Outer())
    with pytest.raises(TypeError, match="more_inputs must be a sequence of inputs"):
        check_compiles(Outer(), torch.randn(2, 4), more_inputs=torch.randn(5, 4))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_recompiles must be a non-negative int"):
        check_compiles(Outer(), torch.randn(2, 4), max_recompiles=-1)
