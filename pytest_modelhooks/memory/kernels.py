"""Where torch's fake kernels part from its real ones, for the memory of a step traced on fake
tensors: what an operation allocates must be what the real kernel allocates.

Two ways they part, both measured against a real step (``tests/memory``):

- **the layout of a gradient.** The real backward kernels of layer norm, batch norm and log
  softmax write a new tensor laid out as their input (contiguous, or channels-last for a batch
  norm given channels-last input: measured on the CPU, and so written in torch's CUDA layer
  norm and its structured log-softmax); their fake kernels follow the layout of the incoming
  gradient instead. A gradient that arrives transposed (Swin's windows, undone
  by a permute) then stays transposed on fake tensors, and the next ``.contiguous()`` or
  ``reshape`` copies it: an allocation the real step never makes.
- **a dtype check.** ``torch._grouped_mm`` (a mixture of experts' layers in one call) has a fake
  kernel that demands bfloat16, as the CUDA kernel does, where the CPU kernel takes float32:
  the output is built from the operands' shapes.

>>> import torch
>>> from pytest_modelhooks._torch import fake_tensor_mode
>>> with fake_tensor_mode() as mode:
...     x = mode.from_tensor(torch.empty(4, 6))
...     grad = mode.from_tensor(torch.empty(6, 4)).t()
...     w, b = mode.from_tensor(torch.empty(6)), mode.from_tensor(torch.empty(6))
...     _, mean, rstd = torch.ops.aten.native_layer_norm(x, [6], w, b, 1e-5)
...     func = torch.ops.aten.native_layer_norm_backward.default
...     args = (grad, x, [6], mean, rstd, w, b, [True, True, True])
...     fake_kernel(func, args, {})[0].stride()
(6, 1)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pytest_modelhooks.tracing.dispatch import grouped_mm_output

aten = torch.ops.aten

_GROUPED_MM = aten._grouped_mm.default if hasattr(aten, "_grouped_mm") else None  # torch >= 2.8


def _contiguous(args: tuple[Any, ...]) -> torch.memory_format:
    return torch.contiguous_format


def _like_input(args: tuple[Any, ...]) -> torch.memory_format:
    # the real kernels ask the input for its suggested memory format
    x = args[1]
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


#: the backward kernels whose first output the real kernel lays out otherwise, and how
_LAYOUTS: dict[Any, Callable[[tuple[Any, ...]], torch.memory_format]] = {
    aten.native_layer_norm_backward.default: _contiguous,
    aten.native_batch_norm_backward.default: _like_input,
    aten._log_softmax_backward_data.default: _contiguous,
}


def _relaid(tensor: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    if tensor.is_contiguous(memory_format=memory_format):
        return tensor
    # under the fake mode (the caller's dispatch mode is off while it runs an operation): a
    # fake tensor of the real kernel's layout, with no data to copy
    return torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device, memory_format=memory_format)


def fake_kernel(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run ``func`` on fake tensors with what the real kernel would allocate."""
    try:
        out = func(*args, **kwargs)
    except RuntimeError:
        built = grouped_mm_output(args, kwargs) if func is _GROUPED_MM and _GROUPED_MM is not None else None
        if built is None:
            raise
        return built
    layout = _LAYOUTS.get(func)
    if layout is None:
        return out
    memory_format = layout(args)
    if isinstance(out, torch.Tensor):
        return _relaid(out, memory_format)
    first, *rest = out
    return (first if first is None else _relaid(first, memory_format), *rest)
