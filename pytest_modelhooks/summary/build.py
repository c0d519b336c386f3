""":func:`model_summary`: a traced forward turned into records, with exact parameter totals (each
tensor once, however many modules share it) and multiply-adds per call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pytest_modelhooks.errors import LayerError
from pytest_modelhooks.inputs import (
    check_model,
    decoder_inputs,
    input_spec,
    is_input_data,
    make_input,
    model_device_dtype,
    normalise_input,
    with_forward_kwargs,
)
from pytest_modelhooks.sizes import is_container
from pytest_modelhooks.summary.records import LayerInfo, ModelSummary
from pytest_modelhooks.tracing.dummy import trace_dummy
from pytest_modelhooks.tracing.engines import gc_paused, trace_model
from pytest_modelhooks.tracing.records import Trace


@dataclass
class _Tally:
    """Parameter counts per module, elements per dtype and the model's buffers (each tensor
    once), from one walk of the tree."""

    counts: dict[str, tuple[int, int, int]]  # name -> (params, trainable, own params)
    param_elements: dict[torch.dtype, int]  # parameter elements per dtype
    buffers: list[torch.Tensor]
    total: int  # of params
    trainable: int


def _tally(entries: list[tuple[str, nn.Module]], module_names: set[str]) -> _Tally:
    """Each module's count is recursive with every tensor once (tied weights), from one pass
    over ``entries``, every path to every module (a reused module's second path included, as
    :attr:`Trace.paths` holds them); asking each module for its parameters() instead is
    quadratic in the depth of nesting."""
    params: dict[int, torch.Tensor] = {}
    buffers: dict[int, torch.Tensor] = {}
    own: dict[str, tuple[int, int]] = {}
    param_elements: dict[torch.dtype, int] = {}
    # more paths than modules: some module is reachable twice
    shared = len(entries) != len(module_names)
    unique_total = unique_trainable = 0
    for path, module in entries:
        if module._buffers:
            for buffer in module._buffers.values():
                if buffer is not None:
                    buffers.setdefault(id(buffer), buffer)
        if not module._parameters:
            continue
        total = trainable = 0
        for param in module._parameters.values():
            if param is None:
                continue
            count = param.numel()
            if id(param) in params:
                shared = True
            else:
                params[id(param)] = param
                param_elements[param.dtype] = param_elements.get(param.dtype, 0) + count
                unique_total += count
                unique_trainable += count if param.requires_grad else 0
            total += count
            trainable += count if param.requires_grad else 0
        own[path] = (total, trainable)
    if shared:
        counts = _shared_counts(entries, module_names)
    else:
        # Nothing is held twice: a parent's count is its own plus its children's, bottom-up
        # (pre-order reversed puts children before their parents). Only modules that hold
        # parameters somewhere below them get an entry; the rest read (0, 0, 0).
        sums = dict(own)
        for path, _ in reversed(entries):
            held = sums.get(path)
            if held is None or not path or not held[0]:
                continue
            parent = path.rpartition(".")[0]
            above = sums.get(parent)
            sums[parent] = held if above is None else (above[0] + held[0], above[1] + held[1])
        counts = {
            path: (total, trainable, own[path][0] if path in own else 0)
            for path, (total, trainable) in sums.items()
        }
    return _Tally(counts, param_elements, list(buffers.values()), unique_total, unique_trainable)


def _shared_counts(
    entries: list[tuple[str, nn.Module]], module_names: set[str]
) -> dict[str, tuple[int, int, int]]:
    """Counts when a parameter or module is reachable twice: sets of tensors per module."""
    members: dict[str, dict[int, torch.Tensor]] = {}
    own: dict[str, dict[int, torch.Tensor]] = {}
    for path, module in entries:
        held = [param for param in module._parameters.values() if param is not None]
        if not held:
            continue
        parts = path.split(".") if path else []
        prefixes = [".".join(parts[:depth]) for depth in range(len(parts) + 1)]
        for param in held:
            if path in module_names:
                own.setdefault(path, {})[id(param)] = param
            for prefix in prefixes:
                if prefix in module_names:  # a reused module's second path has no row of its own
                    members.setdefault(prefix, {})[id(param)] = param
    counts: dict[str, tuple[int, int, int]] = {}
    for name, held_params in members.items():
        total, trainable = _count(list(held_params.values()))
        counts[name] = (total, trainable, sum(param.numel() for param in own.get(name, {}).values()))
    return counts


def _count(params: Sequence[torch.Tensor]) -> tuple[int, int]:
    total = sum(param.numel() for param in params)
    trainable = sum(param.numel() for param in params if param.requires_grad)
    return total, trainable


def _memory(tensors: Sequence[torch.Tensor]) -> tuple[tuple[str, int, int], ...]:
    elements: dict[torch.dtype, int] = {}
    for tensor in tensors:
        elements[tensor.dtype] = elements.get(tensor.dtype, 0) + tensor.numel()
    return _memory_of(elements)


def _memory_of(elements: dict[torch.dtype, int]) -> tuple[tuple[str, int, int], ...]:
    """(dtype name, elements, bytes) per dtype, sorted by name."""
    by_name = {str(dtype).removeprefix("torch."): (n, n * dtype.itemsize) for dtype, n in elements.items()}
    return tuple((name, count, size) for name, (count, size) in sorted(by_name.items()))


def _input_from_size(model: nn.Module, input_size: Any) -> tuple[Any, ...]:
    if isinstance(input_size, Sequence) and input_size and all(isinstance(dim, int) for dim in input_size):
        shapes: list[Sequence[int]] = [input_size]
    elif (
        isinstance(input_size, Sequence)
        and input_size
        and all(
            isinstance(shape, Sequence) and all(isinstance(dim, int) for dim in shape) for shape in input_size
        )
    ):
        shapes = list(input_size)
    else:
        raise ValueError(
            f"input_size must be a shape such as (1, 3, 224, 224) or a list of shapes, "
            f"got input_size={input_size!r}"
        )
    for shape in shapes:
        if not all(dim > 0 for dim in shape):
            raise ValueError(f"input_size must hold positive dimensions, got input_size={input_size!r}")
    device, dtype = model_device_dtype(model)
    token_range = None
    try:
        spec = input_spec(model)
        if spec.layout == "tokens":
            token_range = spec.channels
    except ValueError:
        pass  # the model's first layer is unusual; a float input is the best guess
    return tuple(make_input(shape, device, dtype, token_range=token_range) for shape in shapes)


def _spatial_size_hint(model: nn.Module, input_size: Any, error: LayerError) -> str | None:
    """What to pass instead, where the first convolution failed on an ``input_size`` that holds
    its spatial dimensions alone (``model_sizes``' convention, not this one's)."""
    try:
        spec = input_spec(model)
    except ValueError:
        return None
    shape = tuple(input_size)
    if not all(isinstance(dim, int) for dim in shape):  # several inputs' shapes
        return None
    if spec.layout != "channels_first" or error.layer != spec.layer or len(shape) != spec.spatial_rank:
        return None
    full = (1, spec.channels, *shape)
    return (
        f"input_size is the full input shape, batch and channels included: for a batch of one "
        f"pass input_size={full!r} (model_sizes takes the spatial size alone)"
    )


def model_summary(
    model: nn.Module,
    input_size: Any = None,
    *,
    input_data: Any = None,
    depth: int | None = None,
    count_mult_adds: bool = True,
    engine: str = "auto",
    **forward_kwargs: Any,
) -> ModelSummary:
    """Summarise ``model``: one row per module call in execution order, exact parameter totals,
    parameter and buffer memory by dtype, multiply-adds.

    ``input_size`` is the full input shape, batch included (``(1, 3, 224, 224)``), or a list of
    shapes for several inputs; ``input_data`` is a tensor, a tuple of positional inputs or a
    dict of keyword inputs (the one input when no key names a parameter of the forward;
    ``model_summary(model, x)`` takes a tensor given as ``input_size`` as data); with
    neither, a dummy batch of one is built from the first layer. Any other
    keyword argument goes to the forward beside the input, as in torchinfo
    (``model_summary(encoder, x, src_key_padding_mask=mask)``). ``depth`` folds
    rows deeper than it (totals are unaffected). The forward runs on meta/fake stand-ins for the
    weights whenever it can (no compute, no copy); ``summary.engine`` says which engine ran.
    The model is left with no hooks and the same train/eval flags.

    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> summary = model_summary(net, (1, 4))
    >>> summary.total_params, summary["2"].output_shapes
    (58, torch.Size([1, 2]))
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not ours
    model = check_model(model)
    if depth is not None and (not isinstance(depth, int) or depth < 0):
        raise ValueError(f"depth must be a non-negative int or None, got depth={depth!r}")
    if is_input_data(input_size):
        # model_summary(model, x): a tensor is data, never a shape
        if input_data is not None:
            raise ValueError("got input data both as input_size and as input_data=; pass it once")
        input_size, input_data = None, input_size
    if input_size is not None and input_data is not None:
        raise ValueError("pass either input_size= or input_data=, not both")
    with gc_paused():
        if input_data is None and input_size is None:
            _, kwargs = with_forward_kwargs(model, (), {}, forward_kwargs, "model_summary")
            trace = trace_dummy(model, engine=engine, count_flops=count_mult_adds, kwargs=kwargs)
            return _build(model, trace, depth, count_mult_adds)
        if input_data is not None:
            args, kwargs = normalise_input(input_data, "input_data", model)
            argument = "input_data"
        else:
            args, kwargs = _input_from_size(model, input_size), {}
            argument = "input_size"
        args, kwargs = with_forward_kwargs(model, args, kwargs, forward_kwargs, "model_summary")
        if argument == "input_size" and len(args) == 1:  # (an encoder's input: its decoder's too)
            kwargs = {**decoder_inputs(model, kwargs, batch=args[0].shape[0]), **kwargs}
        try:
            trace = trace_model(
                model, args, kwargs, engine=engine, count_flops=count_mult_adds, argument=argument
            )
        except LayerError as error:
            hint = _spatial_size_hint(model, input_size, error) if argument == "input_size" else None
            if hint is None:
                raise
            raise LayerError(
                f"{error}; {hint}",
                error.layer,
                error.layer_type,
                error.input_shapes,
                error.original,
                error.finished,
            ) from None
        return _build(model, trace, depth, count_mult_adds)


def _build(model: nn.Module, trace: Trace, depth: int | None, count_mult_adds: bool) -> ModelSummary:

    names = {id(module): name for name, module in trace.named}
    tally = _tally(trace.paths, set(names.values()))
    counts_by_name = tally.counts
    calls_by_module: dict[int, int] = {}
    for call in trace.calls:
        calls_by_module[id(call.module)] = calls_by_module.get(id(call.module), 0) + 1

    def counts(module: nn.Module) -> tuple[int, int, int]:
        return counts_by_name.get(names[id(module)], (0, 0, 0))

    def mult_adds(flops: int) -> int | None:
        # torch's formulas count a multiply-add as two operations
        return flops // 2 if count_mult_adds else None

    rows: list[LayerInfo] = []
    for call in trace.calls:
        total, trainable, own = counts_by_name.get(call.name, (0, 0, 0))
        inputs = call.input_shapes
        rows.append(
            LayerInfo._of(
                {
                    "name": call.name,
                    "type": type(call.module).__name__,
                    "depth": call.depth,
                    "call_number": call.call_number,
                    "calls": calls_by_module[id(call.module)],
                    # most modules take one tensor: (1, 3, 8, 8), not ((1, 3, 8, 8),)
                    "input_shapes": inputs[0] if type(inputs) is tuple and len(inputs) == 1 else inputs,
                    "output_shapes": call.output_shapes,
                    "params": total,
                    "own_params": own,
                    "trainable_params": trainable,
                    "mult_adds": call.flops // 2 if count_mult_adds else None,
                    "ran": call.finished,
                }
            )
        )
    idle: list[tuple[str, LayerInfo]] = []
    for _, module in trace.named:
        # a ModuleList/ModuleDict cannot be called: its row says "container", placed above the
        # rows of the modules it holds, so that the tree reads as the model is built
        if id(module) not in calls_by_module:
            name = names[id(module)]
            total, trainable, own = counts(module)
            idle.append(
                (
                    name,
                    LayerInfo(
                        name=name,
                        type=type(module).__name__,
                        depth=name.count(".") + 1 if name else 0,
                        calls=0,
                        params=total,
                        own_params=own,
                        trainable_params=trainable,
                        mult_adds=None,
                        ran=False,
                        container=is_container(module),
                    ),
                )
            )
    rows = _with_idle_rows(rows, idle)

    total, trainable = tally.total, tally.trainable
    return ModelSummary(
        model_name=type(model).__name__,
        layers=tuple(rows),
        input_shapes=rows[0].input_shapes if rows else None,
        output_shapes=trace.output_shapes,
        total_params=total,
        trainable_params=trainable,
        param_memory=_memory_of(tally.param_elements),
        buffer_memory=_memory(tally.buffers),
        mult_adds=mult_adds(trace.total_flops or 0),
        depth=depth,
        engine=trace.engine,
    )


def _with_idle_rows(rows: list[LayerInfo], idle: list[tuple[str, LayerInfo]]) -> list[LayerInfo]:
    """Place each module that never ran where it belongs in the tree: before the first call
    inside it (its children ran without it), else after the last call inside its nearest
    ancestor that ran (``nn.MultiheadAttention.out_proj``, whose weights the attention uses
    directly, right under its attention). Module order is kept among idle siblings."""
    if not idle:
        return rows
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for index, row in enumerate(rows):
        prefix = row.name
        while True:  # the row is inside every prefix of its name, and inside the model ("")
            first.setdefault(prefix, index)
            last[prefix] = index
            if not prefix:
                break
            prefix = prefix.rpartition(".")[0]
    before: dict[int, list[LayerInfo]] = {}  # rows to insert before rows[i]; i == len: at the end
    for name, info in idle:
        if name in first:
            position = first[name]
        else:
            ancestor = name.rpartition(".")[0]
            while ancestor and ancestor not in last:
                ancestor = ancestor.rpartition(".")[0]
            position = last[ancestor] + 1 if ancestor in last else len(rows)
        before.setdefault(position, []).append(info)
    placed: list[LayerInfo] = []
    for index, row in enumerate(rows):
        placed += before.get(index, ())
        placed.append(row)
    placed += before.get(len(rows), ())
    return placed
