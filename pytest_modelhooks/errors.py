"""The exceptions and warnings the package raises that are not findings. No torch import: a
``filterwarnings`` entry or an ``except`` clause naming one costs no ``import torch``."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

__all__ = ["LayerError", "StoredOutputChanged", "describe", "error_text", "not_a_module"]


class LayerError(RuntimeError):
    """A forward failed inside a layer; names the layer and the shapes it received.

    ``.original`` is the exception the layer raised. It is not chained for display: its
    traceback runs through torch's kernels and hooks and would bury the one line that matters.
    ``.finished`` names the layers that returned before the failure.

    >>> from torch import nn
    >>> from pytest_modelhooks import model_sizes
    >>> try:
    ...     model_sizes(nn.Sequential(nn.Linear(4, 8), nn.Linear(9, 2)))
    ... except LayerError as error:
    ...     print(str(error).split(": RuntimeError")[0])
    ...     print(error.layer, error.finished, type(error.original).__name__)
    layer '1' (Linear, in_features=9) got input (1, 8)
    1 ('0',) RuntimeError
    """

    def __init__(
        self,
        message: str,
        layer: str,
        layer_type: str,
        input_shapes: Any,
        original: BaseException | None = None,
        finished: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.layer = layer
        self.layer_type = layer_type
        self.input_shapes = input_shapes
        self.original = original
        self.finished = finished


class StoredOutputChanged(UserWarning):
    """A hook's stored output was changed in place after it was stored (by an in-place op later
    in the forward, such as ``nn.ReLU(inplace=True)``): its values are not what the module
    returned, though its shape is. Importable as ``pytest_modelhooks.StoredOutputChanged``."""


def describe(value: Any, limit: int = 60) -> str:
    """A value as an error message names it: its type and a short repr.

    >>> describe("resnet"), describe(3), describe(None), describe(list(range(100)))[:20]
    ("str 'resnet'", 'int 3', 'None', 'list [0, 1, 2, 3, 4,')
    """
    if value is None:
        return "None"
    shape = getattr(value, "shape", None)
    if shape is not None and not isinstance(value, type):
        return f"{type(value).__name__} of shape {tuple(shape)}"
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(value).__name__} {text}"


def not_a_module(argument: str, value: Any) -> TypeError:
    """The error for ``argument`` given something other than an ``nn.Module``, naming it; a
    model class given where an instance belongs says so.

    >>> str(not_a_module("model", "resnet"))
    "model must be an nn.Module, got str 'resnet'"
    >>> from torch import nn
    >>> str(not_a_module("model", nn.Linear))
    'model must be an nn.Module, got the class Linear: pass an instance, Linear(...)'
    """
    if isinstance(value, type) and callable(getattr(value, "forward", None)):
        return TypeError(
            f"{argument} must be an nn.Module, got the class {value.__name__}: pass an instance, "
            f"{value.__name__}(...)"
        )
    return TypeError(f"{argument} must be an nn.Module, got {describe(value)}")


def error_text(error: BaseException, where: bool = False) -> str:
    """``error`` as a message names it, ``Type: message``; with where it was raised (the deepest
    frame outside torch and this package, the model's own line) when ``where`` is set or it
    says nothing else (a bare ``assert``), and then the line's source too.

    >>> error_text(ValueError("no mask"))
    'ValueError: no mask'
    >>> def check(x):
    ...     assert x > 0
    >>> try:
    ...     check(-1)
    ... except AssertionError as error:
    ...     print(error_text(error).split(" (at ")[0], error_text(error).endswith("in check: assert x > 0)"))
    AssertionError True
    """
    said = str(error)
    text = f"{type(error).__name__}: {said}" if said else type(error).__name__
    if not (where or not said):
        return text
    skipped = tuple(
        os.path.dirname(module.__file__ or "")
        for module in (sys.modules.get("torch"), sys.modules[__name__.rpartition(".")[0]])
        if module is not None and module.__file__
    )
    frames = [
        frame for frame in traceback.extract_tb(error.__traceback__) if not frame.filename.startswith(skipped)
    ]
    if frames:
        frame = frames[-1]
        source = f": {frame.line}" if frame.line and not said else ""
        text += f" (at {frame.filename}:{frame.lineno} in {frame.name}{source})"
    return text
