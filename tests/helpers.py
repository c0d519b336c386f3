"""Assertions shared by the tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from pytest_modelhooks._tree import shapes_of
from pytest_modelhooks.hooks import count_hooks, hooks_by_module, select_modules, training_flags


def _global_hooks() -> dict[str, list[int]]:
    """torch's process-wide module hook tables, including the flags kept beside them."""
    from torch.nn.modules import module as torch_module

    tables = {name: value for name, value in vars(torch_module).items() if name.startswith("_global_")}
    return {name: sorted(table) for name, table in tables.items() if isinstance(table, dict)}


@contextmanager
def untouched(model: nn.Module, *, values: bool = True) -> Iterator[None]:
    """Assert that the block leaves ``model`` exactly as it was: no new hooks, the same
    train/eval flag on every module, the same instance attributes, the same requires_grad flags,
    devices and values (BatchNorm running statistics included, unless ``values=False`` for a
    block that trains), also when the block raises."""
    hooks = hooks_by_module(model)
    global_hooks = _global_hooks()
    flags = training_flags(model)
    requires_grad = {name: param.requires_grad for name, param in model.named_parameters()}
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    attributes = {name: set(vars(module)) for name, module in model.named_modules()}
    try:
        yield
    finally:
        assert hooks_by_module(model) == hooks, f"hooks left behind: {hooks_by_module(model)}"
        assert _global_hooks() == global_hooks, "global module hooks (or their flags) left behind"
        assert training_flags(model) == flags
        # nothing set on an instance and left there (a stand-in forward, a cache)
        assert {name: set(vars(module)) for name, module in model.named_modules()} == attributes
        assert {name: param.requires_grad for name, param in model.named_parameters()} == requires_grad
        for module in model.modules():
            if isinstance(module, nn.RNNBase):  # its private list of weight references
                assert [id(weight) for weight in module._flat_weights] == [
                    id(getattr(module, name)) for name in module._flat_weights_names
                ]
        after = model.state_dict()
        assert after.keys() == state.keys()
        for name, tensor in state.items():
            assert after[name].device == tensor.device, name
            if values and tensor.device.type != "meta":
                assert torch.equal(after[name], tensor), f"{name} changed"


def no_hooks(model: nn.Module) -> bool:
    return count_hooks(model) == 0


def observed_sizes(model: nn.Module, batch: Any, modules: Any = None) -> dict[str, list[Any]]:
    """Output sizes seen by plain torch hooks during a real forward: the independent reference."""
    seen: dict[str, list[Any]] = {}
    handles = []
    for name, module in select_modules(model, modules, default="children"):
        seen[name] = []
        handles.append(
            module.register_forward_hook(lambda m, a, out, name=name: seen[name].append(shapes_of(out)))
        )
    flags = training_flags(model)
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(batch, tuple):
                model(*batch)
            else:
                model(batch)
    finally:
        for handle in handles:
            handle.remove()
        for name, module in model.named_modules():
            module.training = flags[name]
    return seen
