"""A recorded run: every module call in the order they start, with copies of its inputs and
outputs, which call it ran inside and when it returned."""

from __future__ import annotations

import copy
import weakref
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


#: a recording's clones of cache tensors, by the original's id: (the original, its version, clone)
_Shared = dict[int, tuple["weakref.ref[torch.Tensor]", int, torch.Tensor]]


def fresh_caches(
    inputs: Any, convert: Callable[[torch.Tensor], torch.Tensor] | None = None, shared: _Shared | None = None
) -> Any:
    """``inputs`` (a call's args tuple or kwargs dict) with a copy of each cache in it, so that
    running the call again leaves the recorded one as it was; with ``convert``, the tensors
    inside each copy converted too (moved to CUDA with the model the call runs on again).
    With ``shared`` (one dict over a recording's copies, which nothing runs on), a tensor
    unchanged since an earlier copy (the same object at the same version) keeps that copy's
    clone: a cache handed to every layer in turn is then held once, not once per layer.

    >>> class Cache:
    ...     def __init__(self): self.keys = [torch.zeros(1)]
    ...     def get_seq_length(self): return 0
    >>> stored = {"cache": Cache()}
    >>> fresh = fresh_caches(stored, convert=lambda t: t.double())
    >>> fresh["cache"] is stored["cache"], fresh["cache"].keys[0].dtype
    (False, torch.float64)
    """

    def copied(value: Any) -> Any:
        return _copy_cache(value, convert, shared) if _is_cache(value) else value

    if isinstance(inputs, dict):
        return {key: copied(value) for key, value in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(copied(value) for value in inputs)
    return inputs


def _copy_cache(
    cache: Any, convert: Callable[[torch.Tensor], torch.Tensor] | None, shared: _Shared | None = None
) -> Any:
    """A deep copy of ``cache`` with its tensors detached, cloned and converted. ``deepcopy``
    alone refuses a tensor autograd made (a cache filled by a forward with gradients on), and
    a cache has no ``.to()``: each tensor is found first and handed to ``deepcopy`` through its
    memo, and so is each ``device`` the cache keeps beside them (a layer made on the fly reads it)."""
    tensors: dict[int, torch.Tensor] = {}
    devices: list[torch.device] = []
    moved: dict[torch.device, torch.device] = {}
    seen: set[int] = set()
    stack = [cache]
    while stack:  # (deepcopy's own walk: containers and instances' attributes, cycles once)
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            known = shared.get(id(value)) if shared is not None else None
            if known is not None and known[0]() is value and known[1] == value._version:
                tensors[id(value)] = known[2]
            else:
                copy_ = value.detach().clone()
                tensors[id(value)] = copy_ if convert is None else convert(copy_)
                if shared is not None:  # (a weak reference: an id is reused once its tensor is freed)
                    shared[id(value)] = weakref.ref(value), value._version, tensors[id(value)]
            moved[value.device] = tensors[id(value)].device
        elif isinstance(value, torch.device):
            devices.append(value)
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif not isinstance(value, (type, nn.Module)) and hasattr(value, "__dict__"):
            stack.extend(vars(value).values())
    memo: dict[int, Any] = dict(tensors)
    memo.update({id(device): moved[device] for device in devices if device in moved})
    return copy.deepcopy(cache, memo)


def record_calls(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, run: Any = None
) -> list[Call]:
    """Every module call of ``(run or model)(*args, **kwargs)`` in the order they start, with
    copies of their inputs and outputs (hooks removed after). A cache among the inputs is
    copied first: each run starts from the cache as given, and the caller's is left as it was."""
    calls: list[Call] = []
    stack: list[int] = []
    counts: dict[str, int] = {}
    handles = []
    # a cache is given to every layer in turn: each stored copy holds what changed since the last
    shared: _Shared = {}

    def pre(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, call_args: Any, call_kwargs: Any) -> None:
            index = counts.get(name, 0)
            counts[name] = index + 1
            parent = stack[-1] if stack else None
            stored = (
                _detached(fresh_caches(call_args, shared=shared)),
                _detached(fresh_caches(call_kwargs, shared=shared)),
            )
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
            (model if run is None else run)(*fresh_caches(args), **fresh_caches(kwargs))
    finally:
        for handle in handles:
            handle.remove()
    return calls
