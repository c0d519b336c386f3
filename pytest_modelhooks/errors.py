"""The exceptions and warnings the package raises that are not findings. No torch import: a
``filterwarnings`` entry or an ``except`` clause naming one costs no ``import torch``."""

from __future__ import annotations

from typing import Any

__all__ = ["LayerError", "StoredOutputChanged"]


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
