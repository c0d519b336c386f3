"""A recorded run: every module call in the order they start, with copies of its inputs and
outputs, which call it ran inside and when it returned."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pytest_modelhooks._tree import map_tensors

__all__ = ["Call", "fresh_caches", "record_calls"]


@dataclass
class Call:
    """One module call of a recorded run."""

    name: str
    module: nn.Module
    index: int  # which call of this module (a shared module is called more than once)
    parent: int | None  # the call it ran inside
    args: Any = None
    kwargs: Any = None
    output: Any = None
    children: list[int] = field(default_factory=list)
    finished: int = -1  # when it returned, counted over the run's calls

    @property
    def key(self) -> tuple[str, int]:
        return self.name, self.index


def _detached(value: Any) -> Any:
    return map_tensors(value, lambda tensor: tensor.detach().clone())


def _is_cache(value: Any) -> bool:
    """A key/value cache (transformers' ``Cache``): the module it is given appends to it, so a
    call's input is the cache as it stood when the call began, not the object later calls grew."""
    return callable(getattr(value, "get_seq_length", None)) and not isinstance(
        value, (torch.Tensor, nn.Module)
    )


def fresh_caches(inputs: Any) -> Any:
    """``inputs`` (a call's args tuple or kwargs dict) with a copy of each cache in it, so that
    running the call again leaves the recorded one as it was.

    >>> class Cache:
    ...     def get_seq_length(self): return 0
    >>> stored = {"cache": Cache()}
    >>> fresh_caches(stored)["cache"] is stored["cache"]
    False
    """
    if isinstance(inputs, dict):
        return {key: copy.deepcopy(value) if _is_cache(value) else value for key, value in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(copy.deepcopy(value) if _is_cache(value) else value for value in inputs)
    return inputs


def record_calls(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, run: Any = None
) -> list[Call]:
    """Every module call of ``(run or model)(*args, **kwargs)`` in the order they start, with
    copies of their inputs and outputs (hooks removed after)."""
    calls: list[Call] = []
    stack: list[int] = []
    counts: dict[str, int] = {}
    handles = []

    def pre(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, call_args: Any, call_kwargs: Any) -> None:
            index = counts.get(name, 0)
            counts[name] = index + 1
            parent = stack[-1] if stack else None
            stored = _detached(fresh_caches(call_args)), _detached(fresh_caches(call_kwargs))
            calls.append(Call(name, module, index, parent, *stored))
            if parent is not None:
                calls[parent].children.append(len(calls) - 1)
            stack.append(len(calls) - 1)

        return hook

    done = [0]  # a plain counter: dynamo traces these hooks inside a compiled model too

    def post(module: nn.Module, call_args: Any, call_kwargs: Any, output: Any) -> None:
        if stack:
            call = calls[stack.pop()]
            call.output, call.finished = _detached(output), done[0]
            done[0] += 1

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(pre(name), with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            (model if run is None else run)(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return calls
