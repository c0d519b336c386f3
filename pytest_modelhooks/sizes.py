""":func:`model_sizes`: the output size of each layer, by position (fastai's list) and by
name; :func:`num_features_model`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, cast, overload

import torch
from torch import nn

from pytest_modelhooks._tree import format_shape, jsonable_shape, tensor_leaves
from pytest_modelhooks.errors import LayerError
from pytest_modelhooks.hooks.select import ModuleSpec, select_modules
from pytest_modelhooks.inputs import (
    check_model,
    input_spec,
    is_input_data,
    normalise_input,
    with_forward_kwargs,
)
from pytest_modelhooks.tracing.dummy import trace_dummy
from pytest_modelhooks.tracing.engines import gc_paused, trace_model

__all__ = ["LayerSizes", "is_container", "model_sizes", "num_features_model"]


class LayerSizes(Sequence[Any]):
    """The output size of each selected layer, by position (as fastai's list) and by name.

    ``sizes[i]`` is the i-th selected layer (by default the model's direct children, in order:
    fastai's list); ``sizes["encoder.stage2"]`` takes the qualified name of *any* module of the
    model, selected or not. Either gives the output of the layer's last call: a ``torch.Size``
    (batch dimension included), or the same structure of sizes for tuple/dict outputs, or
    ``None`` for a selected layer that never ran; a module that was not selected and never ran
    raises ``KeyError`` saying so. ``sizes.calls(name)`` lists every call.

    >>> net = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Linear(8, 2))
    >>> sizes = model_sizes(net, input=torch.zeros(2, 4))
    >>> sizes.names, sizes[-1], sizes["0"], sizes["0.1"], sizes.calls("1")
    (('0', '1'), torch.Size([2, 2]), torch.Size([2, 8]), torch.Size([2, 8]), [torch.Size([2, 2])])
    """

    def __init__(
        self,
        names: Sequence[str],
        types: Sequence[str],
        calls: Mapping[str, list[Any]],
        engine: str,
        containers: Iterable[str] = (),
        others: Mapping[str, tuple[str, list[Any]]] | None = None,
    ) -> None:
        self.names: tuple[str, ...] = tuple(names)
        self.types: tuple[str, ...] = tuple(types)
        self._calls = {name: list(calls.get(name, [])) for name in self.names}
        self.engine = engine
        #: the ModuleList/ModuleDict containers: they hold layers but are never called
        self.containers = frozenset(containers)
        # every other module of the model, by qualified name: (type, output sizes per call)
        self._others = {
            name: (kind, list(shapes))
            for name, (kind, shapes) in (others or {}).items()
            if name not in self._calls
        }

    def _lookup(self, name: str) -> list[Any]:
        """The output sizes of every call of module ``name``; ``KeyError`` naming the measured
        layers when the model has no such module."""
        if name in self._calls:
            return self._calls[name]
        if name in self._others:
            return self._others[name][1]
        shown = ", ".join(self.names[:12]) + (", ..." if len(self.names) > 12 else "")
        raise KeyError(f"{name!r} is not a module of the model; the measured layers are: {shown}")

    @overload
    def __getitem__(self, index: int | str) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...
    def __getitem__(self, index: int | str | slice) -> Any:
        if isinstance(index, slice):
            return [self[name] for name in self.names[index]]
        if isinstance(index, str):
            calls = self._lookup(index)
            if not calls and index in self._others:
                kind = self._others[index][0]
                if index in self.containers:
                    raise KeyError(
                        f"{index!r} ({kind}) is a container: it is never called, so it has no output size"
                    )
                raise KeyError(f"{index!r} ({kind}) never ran in this forward: it has no output size")
            return calls[-1] if calls else None
        return self[self.names[index]]

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[Any]:
        return (self[name] for name in self.names)

    def calls(self, name: str) -> list[Any]:
        """The output size of every call of module ``name`` (any module of the model), in order:
        empty for one that never ran."""
        return list(self._lookup(name))

    def ran(self, name: str) -> bool:
        """Whether module ``name`` (any module of the model) ran during the forward."""
        return bool(self.calls(name))

    @property
    def never_ran(self) -> list[str]:
        """The selected layers that did not run (containers, which cannot run, excluded)."""
        return [name for name in self.names if not self._calls[name] and name not in self.containers]

    def items(self) -> list[tuple[str, Any]]:
        """``(name, size)`` pairs, in order."""
        return [(name, self[name]) for name in self.names]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{name: {"type": ..., "calls": [shape, ...]}}`` with shapes as lists."""
        return {
            name: {"type": kind, "calls": [jsonable_shape(shape) for shape in self._calls[name]]}
            for name, kind in zip(self.names, self.types, strict=True)
        }

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LayerSizes):
            return self.names == other.names and self._calls == other._calls
        if isinstance(other, (list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __str__(self) -> str:
        width = max(
            (len(name) + len(kind) + 3 for name, kind in zip(self.names, self.types, strict=True)), default=0
        )
        lines = []
        for name, kind in zip(self.names, self.types, strict=True):
            calls = self._calls[name]
            label = f"{name} ({kind})".ljust(width)
            if not calls:
                lines.append(
                    f"{label}  {'container, not called' if name in self.containers else 'never ran'}"
                )
            else:
                lines.append(f"{label}  " + "  |  ".join(format_shape(shape) for shape in calls))
        return "\n".join(lines)

    def __repr__(self) -> str:
        inner = ", ".join(f"{name!r}: {format_shape(self[name])}" for name in self.names)
        return f"LayerSizes({{{inner}}}, engine={self.engine!r})"


def model_sizes(
    model: nn.Module,
    size: Sequence[int] | torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    input: Any = None,
    modules: ModuleSpec = None,
    engine: str = "auto",
    **forward_kwargs: Any,
) -> LayerSizes:
    """The output size of each layer of ``model`` for a batch of one of spatial ``size``.

    Works on any ``nn.Module``. ``modules`` defaults to the model's direct children (fastai's
    order for a Sequential; the model itself when it has none); it also takes ``"leaves"``,
    ``"all"``, qualified names or globs, module types or module objects. ``input`` (a tensor,
    a tuple of positional inputs or a dict of keyword inputs, or the one input when no key
    names a parameter of the forward) replaces the dummy batch for
    models whose input cannot be guessed (data given as ``size``, ``model_sizes(model, x)``,
    is taken as ``input``); nested (ragged) tensors run on the real engine, and their sizes
    hold ``None`` in a ragged dimension (shown as ``2..5``, shortest to longest). Any other
    keyword argument goes to the forward beside the input (``src_key_padding_mask=mask``).
    No weights are computed on or copied when the meta/fake engines can run the model
    (``sizes.engine`` tells which ran).

    >>> net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten())
    >>> sizes = model_sizes(net, (32, 32))
    >>> sizes[0], sizes[-1], sizes.engine
    (torch.Size([1, 16, 16, 16]), torch.Size([1, 4096]), 'meta')
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not ours
    model = check_model(model)
    if is_input_data(size):
        if input is not None:
            raise ValueError("got input data both as size and as input=; pass it once")
        size, input = None, size
    with gc_paused():
        return _model_sizes(model, cast("Sequence[int] | None", size), input, modules, engine, forward_kwargs)


def _model_sizes(
    model: nn.Module,
    size: Sequence[int] | None,
    input: Any,
    modules: ModuleSpec,
    engine: str,
    forward_kwargs: dict[str, Any],
) -> LayerSizes:
    __tracebackhide__ = True
    # a model without children (a bare nn.LSTM) is its own only layer
    default = "children" if next(model.children(), None) is not None else "all"
    selected = select_modules(model, modules, default=default)
    if (modules == "all" or (modules is None and default == "all")) and len(selected) > 1:
        # the model's own output last: sizes[-1] is what the model returns, as with the children
        selected = [*selected[1:], selected[0]]
    if input is None:
        _, kwargs = with_forward_kwargs(model, (), {}, forward_kwargs, "model_sizes")
        trace = trace_dummy(model, size, engine=engine, kwargs=kwargs)
    else:
        if size is not None:
            raise ValueError("pass either size= or input=, not both")
        args, kwargs = normalise_input(input, "input", model)
        args, kwargs = with_forward_kwargs(model, args, kwargs, forward_kwargs, "model_sizes")
        trace = trace_model(model, args, kwargs, engine=engine)
    by_module: dict[int, list[Any]] = {}
    for call in trace.calls:
        by_module.setdefault(id(call.module), []).append(call.output_shapes)
    if modules == "leaves":
        selected = _with_working_parents(selected, trace.named, by_module)
    calls = {name: by_module.get(id(module), []) for name, module in selected}
    # every path to every module: a reused module answers under each of its names
    others = {name: (type(module).__name__, by_module.get(id(module), [])) for name, module in trace.paths}
    return LayerSizes(
        [name for name, _ in selected],
        [type(module).__name__ for _, module in selected],
        calls,
        trace.engine,
        containers=[name for name, module in trace.paths if is_container(module)],
        others=others,
    )


def _with_working_parents(
    leaves: list[tuple[str, nn.Module]], named: list[tuple[str, nn.Module]], ran: dict[int, list[Any]]
) -> list[tuple[str, nn.Module]]:
    """The leaves, and each module that ran while nothing inside it did: it did the work itself
    (``nn.MultiheadAttention`` uses its ``out_proj`` weights directly, and ``out_proj`` never
    runs), so it is a leaf of the forward that ran. In the model's order."""
    chosen = {id(module) for _, module in leaves}
    working = {
        id(module)
        for _, module in named
        if id(module) in ran
        and id(module) not in chosen
        and next(module.children(), None) is not None
        and not any(id(inner) in ran for inner in module.modules() if inner is not module)
    }
    if not working:
        return leaves
    return [(name, module) for name, module in named if id(module) in chosen or id(module) in working]


def is_container(module: nn.Module) -> bool:
    """ModuleList, ModuleDict and the parameter containers hold things but cannot be called."""
    return isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict))


_SIZE_ERROR = re.compile(
    r"kernel size can't be greater|output size is too small|input size|too small|"
    r"smaller than|larger than the input|padding|pad should be",
    re.IGNORECASE,
)


def num_features_model(model: nn.Module, *, max_side: int = 4096) -> int:
    """The number of features (channels) ``model`` outputs: dimension 1 of its output for a
    dummy batch. Tries small inputs first (8, 16, 32, ...) and retries a larger one only when the
    forward failed because the input was too small; other errors propagate.

    >>> num_features_model(nn.Sequential(nn.Conv2d(3, 32, 3), nn.AdaptiveAvgPool2d(1)))
    32
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not ours
    spec = input_spec(model)
    side = 8
    while True:
        size = (side,) * spec.spatial_rank if spec.spatial_rank else None
        try:
            sizes = model_sizes(model, size, modules="all")
        except LayerError as error:
            cause = error.original or error
            if spec.spatial_rank is None or side >= max_side or not _SIZE_ERROR.search(str(cause)):
                raise
            side *= 2
            continue
        output = sizes[""]
        leaves = (
            [shape for _, shape in tensor_leaves(output)] if not isinstance(output, torch.Size) else [output]
        )
        if not leaves or len(leaves[0]) < 2:
            raise ValueError(f"{type(model).__name__} output {format_shape(output)} has no feature dimension")
        return int(leaves[0][1])
