"""Every entry point frees what it made by reference counting alone: nothing of this package,
and no real tensor, is left in a reference cycle for the garbage collector. A tensor in a cycle
holds its memory (on a GPU too) until a collection runs, and a full collection of a large
model's objects costs tens of milliseconds in the middle of a training loop."""

from __future__ import annotations

import gc
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn

import pytest_modelhooks as pm


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 12 * 12, 4),
    )


MODEL = _net()
BATCH = torch.randn(2, 3, 16, 16)
TARGET = torch.tensor([0, 1])


def _recorded_forward() -> Any:
    with pm.ActivationStats(MODEL) as stats:
        MODEL(BATCH)
    return stats.stats


def _recorded_step() -> Any:
    with pm.GradientStats(MODEL) as stats:
        MODEL(BATCH).sum().backward()
    MODEL.zero_grad(set_to_none=True)
    return stats.total_norm()


def _hooks() -> Any:
    with pm.hook_outputs(MODEL) as hooks:
        MODEL(BATCH)
    return hooks.stored


class _OwnHooks(pm.HookCallback):
    """A user's callback: it keeps its hooks, which call its own method."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.outputs: list[torch.Tensor] = []

    def hook(self, module: nn.Module, input: Any, output: Any) -> None:
        self.outputs.append(output)


def _own_callback() -> Any:
    with _OwnHooks(MODEL) as callback:
        MODEL(BATCH)
    return callback.outputs


ENTRY_POINTS: dict[str, Callable[[], Any]] = {
    "Hooks": _hooks,
    "HookCallback subclass": _own_callback,
    "ActivationStats": _recorded_forward,
    "GradientStats": _recorded_step,
    "model_sizes": lambda: pm.model_sizes(MODEL, (16, 16)),
    "model_summary": lambda: pm.model_summary(MODEL, input_data=BATCH),
    "trace_model": lambda: pm.trace_model(MODEL, (BATCH,)),
    "batch_leaks": lambda: pm.batch_leaks(MODEL, BATCH),
    "nondeterministic_layers": lambda: pm.nondeterministic_layers(MODEL, BATCH),
    "model_memory": lambda: pm.model_memory(MODEL, BATCH),
    "fingerprints": lambda: pm.fingerprints(MODEL, BATCH),
    "first_divergence against a model": lambda: pm.first_divergence(MODEL, BATCH, against=_net()),
    "first_divergence against bf16": lambda: pm.first_divergence(MODEL, BATCH, against="bf16"),
    "export_problems": lambda: pm.export_problems(MODEL, BATCH),
    "export_problems at a second batch size": lambda: pm.export_problems(
        MODEL, BATCH, dynamic_shapes="batch"
    ),
    "input_use": lambda: pm.input_use(MODEL, BATCH),
    "check_loss_at_init": lambda: pm.check_loss_at_init(MODEL, (BATCH, TARGET)),
    "load_problems": lambda: pm.load_problems(MODEL, MODEL.state_dict()),
}


def _ours(thing: object) -> bool:
    """Whether a collected object is this package's, or a tensor with real storage (torch's
    own tracing keeps fake tensors in cycles of its own; those hold no memory)."""
    kind = type(thing)  # (never isinstance: a dead weak proxy raises on it)
    if kind.__module__.startswith("pytest_modelhooks"):
        return True
    if kind is types.FunctionType:
        return "pytest_modelhooks" in thing.__code__.co_filename  # type: ignore[attr-defined]
    if issubclass(kind, torch.Tensor):
        from torch._subclasses.fake_tensor import FakeTensor

        return not issubclass(kind, FakeTensor) and not thing.is_meta  # type: ignore[attr-defined]
    return False


@contextmanager
def collected() -> Iterator[list[object]]:
    """Fills the list it gives with what the collector finds unreachable by the block's end."""
    found: list[object] = []
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # the unreachable are saved in gc.garbage, not freed
    try:
        yield found
        gc.collect()
        found.extend(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_an_entry_point_leaves_nothing_in_a_cycle(name: str) -> None:
    call = ENTRY_POINTS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (findings about the tiny model are not the point)
        call()  # the first call may build caches and import modules; those are not garbage
        with collected() as garbage:
            call()
    left = sorted(
        {f"{type(thing).__module__}.{type(thing).__qualname__}" for thing in garbage if _ours(thing)}
    )
    assert not left, f"{name} left these in reference cycles: {left}"


def test_the_check_sees_a_cycle() -> None:
    """The check above is not blind: a recorder whose hooks still hold its method is found."""

    class Keeper(pm.HookCallback):
        def hook(self, module: nn.Module, input: Any, output: Any) -> None:
            pass

    with collected() as garbage:
        keeper = Keeper(MODEL)
        keeper.on_train_begin()
        assert keeper.hooks is not None
        for hook in keeper.hooks:
            hook._handle.remove()  # type: ignore[union-attr]  # off the model, still holding hook_func
        del keeper, hook
    assert any(type(thing).__qualname__.endswith("Keeper") for thing in garbage)
    assert any(_ours(thing) for thing in garbage)  # its Hook objects
