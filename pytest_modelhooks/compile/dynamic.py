"""``dynamic=``: which sizes of the inputs a compile or an export treats as dynamic.

``None``, ``True`` and ``False`` are ``torch.compile``'s own (None: static at first, dynamic
after a size changes; True: every size; False: none). ``"batch"`` marks the first dimension of
every tensor input dynamic; a mapping marks chosen ones: ``{"x": 0}``, ``{0: (0, 1)}``, keys
the forward's parameter names or positions. A marked size the code specialises (``if
x.shape[0] == 5``) is a finding, not a silent recompile.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from pytest_modelhooks._torch import mark_dynamic
from pytest_modelhooks._tree import tensor_leaves
from pytest_modelhooks.errors import describe
from pytest_modelhooks.inputs import forward_parameter_names

__all__ = ["Dynamic", "dynamic_marks", "marked", "torch_flag"]

#: what ``dynamic=`` accepts
Dynamic = bool | str | Mapping[int | str, int | Sequence[int]] | None


def torch_flag(dynamic: Dynamic) -> bool | None:
    """The ``torch.compile(dynamic=...)`` flag ``dynamic`` stands for (marks aside)."""
    return dynamic if isinstance(dynamic, bool) else None


def _check(dynamic: Any) -> None:
    if dynamic is None or isinstance(dynamic, bool) or dynamic == "batch" or isinstance(dynamic, Mapping):
        return
    raise ValueError(
        "dynamic must be None, True, False, 'batch' or a mapping from an input (the forward's "
        f"parameter name or position) to its dynamic dimension(s), got dynamic={describe(dynamic)}"
    )


def _dims(value: Any, key: Any) -> list[int]:
    dims = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(dims, Sequence) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in dims
    ):
        raise ValueError(f"dynamic[{key!r}] must be a dimension or a sequence of them, got {describe(value)}")
    return list(dims)


def dynamic_marks(
    model: nn.Module, dynamic: Dynamic, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> list[tuple[torch.Tensor, list[int]]]:
    """The tensors of one call to mark dynamic and their dimensions (none for None/True/False).
    A key that names no input, or a dimension the tensor lacks, is a ValueError naming it."""
    _check(dynamic)
    if dynamic is None or isinstance(dynamic, bool):
        return []
    if dynamic == "batch":
        leaves = [tensor for _, tensor in tensor_leaves((tuple(args), dict(kwargs)))]
        marks = [(tensor, [0]) for tensor in leaves if tensor.dim() >= 1]
        if any(tensor.shape[0] < 2 for tensor, _ in marks):
            shapes = ", ".join(str(tuple(tensor.shape)) for tensor, _ in marks)
            raise ValueError(
                "dynamic='batch' needs a batch of 2 or more: dynamo makes sizes 0 and 1 static, and "
                f"the inputs have shapes {shapes}"
            )
        return marks
    assert isinstance(dynamic, Mapping)
    names = forward_parameter_names(model, positional=True)
    marks = []
    for key, value in dynamic.items():
        if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(args):
            target = args[key]
        elif isinstance(key, str) and key in kwargs:
            target = kwargs[key]
        elif isinstance(key, str) and key in names and names.index(key) < len(args):
            target = args[names.index(key)]
        else:
            given = [*range(len(args)), *kwargs]
            raise ValueError(
                f"dynamic names {key!r}, which is no input of this call (positions and names "
                f"given: {', '.join(map(repr, given)) or 'none'})"
            )
        if not isinstance(target, torch.Tensor):
            raise ValueError(f"dynamic[{key!r}]: the input is {describe(target)}, not a tensor")
        dims = _dims(value, key)
        for dim in dims:
            if not -target.dim() <= dim < target.dim():
                raise ValueError(
                    f"dynamic[{key!r}] = {value!r}: the input has shape {tuple(target.shape)}, "
                    f"no dimension {dim}"
                )
        marks.append((target, [dim % target.dim() for dim in dims]))
    return marks


@contextmanager
def marked(marks: Sequence[tuple[torch.Tensor, list[int]]]) -> Iterator[None]:
    """The tensors marked dynamic (``torch._dynamo.mark_dynamic``) for the block; the
    attributes marking sets on a tensor are removed after, so the user's inputs are left as
    they were."""
    # copies: marking adds to the sets a tensor marked before already holds
    before = [(tensor, {key: copy.copy(value) for key, value in vars(tensor).items()}) for tensor, _ in marks]
    try:
        for tensor, dims in marks:
            mark_dynamic(tensor, dims)
        yield
    finally:
        for tensor, attributes in before:
            for name in set(vars(tensor)) - set(attributes):
                delattr(tensor, name)
            vars(tensor).update(attributes)
