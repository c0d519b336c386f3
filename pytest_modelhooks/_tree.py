"""Walking the nested structures that modules take and return.

Modules return tensors, tuples, lists, dicts, NamedTuples and dataclass-like records such as
Hugging Face's ``ModelOutput`` (an ``OrderedDict`` that is also a dataclass). Every layer of the
library (detaching stored outputs, sizes, summaries, statistics) walks them the same way, so the
walk lives here once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.nn.utils.rnn import PackedSequence

__all__ = [
    "NestedSize",
    "PackedShape",
    "format_shape",
    "jsonable_shape",
    "map_tensors",
    "nested_size",
    "shapes_of",
    "tensor_leaves",
]


class NestedSize(tuple[int | None, ...]):
    """The size of a nested (ragged) tensor, which has no single ``torch.Size``: the number of
    components, then each dimension's length, ``None`` where it varies between components.
    ``spans`` keeps those dimensions' (shortest, longest) for display.

    >>> x = torch.nested.nested_tensor([torch.ones(2, 4), torch.ones(3, 4)], layout=torch.jagged)
    >>> size = nested_size(x)
    >>> size, size.spans
    ((2, None, 4), {1: (2, 3)})
    >>> format_shape(size)
    '(2, 2..3, 4)'
    """

    spans: dict[int, tuple[int, int]]

    def __new__(cls, dims: Any, spans: dict[int, tuple[int, int]] | None = None) -> NestedSize:
        size = super().__new__(cls, dims)
        size.spans = dict(spans or {})
        return size

    def __reduce__(self) -> tuple[Any, ...]:  # pickles (xdist, caches) with its spans
        return (NestedSize, (tuple(self), self.spans))


class PackedShape(tuple[Any, ...]):
    """The shapes inside a ``PackedSequence``: ``(data, batch_sizes, sorted_indices,
    unsorted_indices)``, equal to that plain tuple, shown as ``packed(10, 16; 5 steps)``: the
    packed data (every sequence's steps, then features) and the longest sequence.

    >>> from torch.nn.utils.rnn import pack_sequence
    >>> shape = shapes_of(pack_sequence([torch.ones(3, 4), torch.ones(2, 4)]))
    >>> format_shape(shape), shape == ((5, 4), (3,), None, None)
    ('packed(5, 4; 3 steps)', True)
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (PackedShape, (tuple(self),))


def nested_size(tensor: torch.Tensor) -> NestedSize:
    """The :class:`NestedSize` of a nested tensor (strided or jagged layout)."""
    shapes = [tuple(component.shape) for component in tensor.unbind()]
    dims: list[int | None] = [len(shapes)]
    spans: dict[int, tuple[int, int]] = {}
    for axis in range(tensor.dim() - 1):
        lengths = [shape[axis] for shape in shapes if axis < len(shape)]
        low, high = (min(lengths), max(lengths)) if lengths else (0, 0)
        if low == high:
            dims.append(low)
        else:
            dims.append(None)
            spans[axis + 1] = (low, high)
    return NestedSize(dims, spans)


def _is_dataclass_instance(obj: object) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _rebuild_dataclass(obj: Any, values: dict[str, Any]) -> Any:
    try:
        return dataclasses.replace(obj, **values)
    except (TypeError, ValueError):
        # Fields with init=False or a __post_init__ that rejects the values: fall back to a
        # copy with the attributes set directly, which keeps the type and the other fields.
        import copy

        new = copy.copy(obj)
        for name, value in values.items():
            object.__setattr__(new, name, value)
        return new


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Apply ``fn`` to every tensor inside ``obj``, keeping the structure and its types.

    >>> map_tensors((torch.ones(2), {"a": torch.zeros(1)}), lambda t: t.shape)
    (torch.Size([2]), {'a': torch.Size([1])})
    """
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if _is_dataclass_instance(obj):
        values = {
            field.name: map_tensors(getattr(obj, field.name), fn)
            for field in dataclasses.fields(obj)
            if hasattr(obj, field.name)
        }
        return _rebuild_dataclass(obj, values)
    if isinstance(obj, PackedSequence):
        # batch_sizes stays where it is: torch requires it on the CPU (as PackedSequence.to does)
        return obj._replace(
            data=fn(obj.data),
            sorted_indices=map_tensors(obj.sorted_indices, fn),
            unsorted_indices=map_tensors(obj.unsorted_indices, fn),
        )
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # NamedTuple
        return type(obj)(*(map_tensors(item, fn) for item in obj))
    if isinstance(obj, (tuple, list)):
        items = [map_tensors(item, fn) for item in obj]
        return type(obj)(items) if type(obj) in (tuple, list) else _rebuild_sequence(obj, items)
    if isinstance(obj, Mapping):
        mapped = {key: map_tensors(value, fn) for key, value in obj.items()}
        if type(obj) is dict:
            return mapped
        try:
            return type(obj)(mapped)  # type: ignore[call-arg]
        except Exception:  # a Mapping subclass with an unusual constructor
            return mapped
    return obj


def _rebuild_sequence(obj: tuple[Any, ...] | list[Any], items: list[Any]) -> Any:
    try:
        return type(obj)(items)
    except Exception:  # a subclass with an unusual constructor: keep the plain container
        return tuple(items) if isinstance(obj, tuple) else items


def tensor_leaves(obj: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(path, tensor)`` for every tensor inside ``obj``, in a stable order.

    Paths read like Python: ``[0]`` for sequence items, ``.logits`` for dataclass fields and
    string dict keys that are identifiers, ``['key']`` otherwise.

    >>> [p for p, _ in tensor_leaves((torch.ones(1), {"h": torch.ones(1)}))]
    ['[0]', '[1].h']
    """
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif _is_dataclass_instance(obj):
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name, None)
            yield from tensor_leaves(value, f"{path}.{field.name}")
    elif isinstance(obj, (tuple, list)):
        for index, item in enumerate(obj):
            yield from tensor_leaves(item, f"{path}[{index}]")
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            if isinstance(key, str) and key.isidentifier():
                yield from tensor_leaves(value, f"{path}.{key}")
            else:
                yield from tensor_leaves(value, f"{path}[{key!r}]")


def shapes_of(obj: Any) -> Any:
    """The structure of ``obj`` with every tensor replaced by its ``torch.Size``; other leaves
    become ``None``. Tuples (NamedTuples included) become plain tuples (a ``PackedSequence``
    a :class:`PackedShape`), lists stay lists, mappings and dataclasses become dicts.

    >>> shapes_of((torch.ones(2), [torch.ones(1, 3)], {"a": 1}))
    (torch.Size([2]), [torch.Size([1, 3])], {'a': None})
    """
    # Called for every module call of a traced forward: the common cases come first.
    if isinstance(obj, torch.Tensor):
        return nested_size(obj) if obj.is_nested else obj.shape
    kind = type(obj)
    if kind is tuple:
        return tuple([shapes_of(item) for item in obj])
    if kind is list:
        return [shapes_of(item) for item in obj]
    if kind is dict:
        return {key: shapes_of(value) for key, value in obj.items()}
    if isinstance(obj, PackedSequence):
        return PackedShape(shapes_of(item) for item in obj)
    if _is_dataclass_instance(obj):
        return {
            field.name: shapes_of(getattr(obj, field.name, None))
            for field in dataclasses.fields(obj)
            if getattr(obj, field.name, None) is not None
        }
    if isinstance(obj, tuple):
        return tuple([shapes_of(item) for item in obj])
    if isinstance(obj, list):
        return [shapes_of(item) for item in obj]
    if isinstance(obj, Mapping):
        return {key: shapes_of(value) for key, value in obj.items()}
    return None


def format_shape(shape: Any) -> str:
    """Render a structure of shapes as deterministic text.

    >>> format_shape((torch.Size([1, 3]), {"a": torch.Size([2])}))
    '((1, 3), {a: (2,)})'
    """
    if isinstance(shape, torch.Size):
        return "(" + ", ".join(str(dim) for dim in shape) + ("," if len(shape) == 1 else "") + ")"
    if isinstance(shape, PackedShape) and isinstance(shape[0], torch.Size):
        steps = shape[1][0] if isinstance(shape[1], torch.Size) and len(shape[1]) == 1 else "?"
        return "packed(" + ", ".join(str(dim) for dim in shape[0]) + f"; {steps} steps)"
    if isinstance(shape, NestedSize):  # ragged dimensions as shortest..longest
        spans = shape.spans
        return (
            "("
            + ", ".join(
                str(dim) if dim is not None else "{}..{}".format(*spans[axis])
                for axis, dim in enumerate(shape)
            )
            + ")"
        )
    if isinstance(shape, tuple):
        inner = ", ".join(format_shape(item) for item in shape)
        return "(" + inner + ("," if len(shape) == 1 else "") + ")"
    if isinstance(shape, list):
        return "[" + ", ".join(format_shape(item) for item in shape) + "]"
    if isinstance(shape, dict):
        return "{" + ", ".join(f"{key}: {format_shape(value)}" for key, value in shape.items()) + "}"
    if shape is None:
        return "-"
    return repr(shape)


def jsonable_shape(shape: Any) -> Any:
    """A structure of shapes with lists for sizes and string keys: ready for ``json.dumps``.

    >>> jsonable_shape((torch.Size([1, 3]), {0: torch.Size([2])}))
    [[1, 3], {'0': [2]}]
    """
    if isinstance(shape, (torch.Size, NestedSize)):
        return list(shape)  # a ragged dimension is null
    if isinstance(shape, (tuple, list)):
        return [jsonable_shape(item) for item in shape]
    if isinstance(shape, dict):
        return {str(key): jsonable_shape(value) for key, value in shape.items()}
    return shape


#: ``torch.testing.assert_close``'s default tolerances, ``(rtol, atol)`` per dtype
ASSERT_CLOSE_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
}


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` as ``torch.testing.assert_close`` defaults them for ``dtype`` (float32's
    for any other, zero for exact types).

    >>> default_tolerances(torch.bfloat16)
    (0.016, 1e-05)
    """
    if not (dtype.is_floating_point or dtype.is_complex):
        return 0.0, 0.0
    return ASSERT_CLOSE_TOLERANCES.get(dtype, ASSERT_CLOSE_TOLERANCES[torch.float32])
