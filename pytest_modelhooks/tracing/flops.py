"""Flop formulas: torch's own (``torch.utils.flop_counter``) plus one small formula per op torch has
none for (fused recurrent kernels, ``nn.Bilinear``, grouped matmuls), kept in one registry.

A formula takes the op's arguments (and ``out_val``, its output) and returns the op's flops, two a
multiply-add, as torch's do. :func:`formula` registers one under an ATen op name; where this torch
has no such op it is skipped, and where torch has a formula of its own, torch's wins.

>>> sorted(OUR_FORMULAS)[:2]
['_cudnn_rnn', '_grouped_mm']
>>> formulas()[torch.ops.aten.mm] is not None
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["OUR_FORMULAS", "formula", "formulas", "matmul_flops"]

aten = torch.ops.aten

Formula = Callable[..., int]

#: ATen op name -> the formula for an op that torch's flop counter has none for.
OUR_FORMULAS: dict[str, Formula] = {}


def formula(*op_names: str) -> Callable[[Formula], Formula]:
    """Register the decorated function as the flop formula of the ATen ops ``op_names``."""

    def register(function: Formula) -> Formula:
        for name in op_names:
            OUR_FORMULAS[name] = function
        return function

    return register


def formulas() -> dict[Any, Formula]:
    """Op packet -> formula: torch's registry, with ours added where torch has none."""
    try:
        from torch.utils.flop_counter import flop_registry
    except ImportError:  # very old torch: no flop formulas, no counts
        return {}
    registry: dict[Any, Formula] = dict(flop_registry)
    # The CPU's fused attention has no formula of its own: without one, a real forward on the
    # CPU would count no attention matmuls, while meta (which decomposes it) counts them all.
    flash = registry.get(aten._scaled_dot_product_flash_attention)
    cpu_flash = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if flash is not None and cpu_flash is not None:
        registry.setdefault(cpu_flash, flash)
    for name, function in OUR_FORMULAS.items():
        op = getattr(aten, name, None)
        if op is not None:
            registry.setdefault(op, function)
    return registry


@formula("_grouped_mm")  # MoE experts: no torch formula
def _grouped_mm_flops(
    mat_a: torch.Tensor, mat_b: torch.Tensor, *args: Any, out_val: Any = None, **kwargs: Any
) -> int:
    """Each output element is a dot product over its group's contraction length; with two 2-D
    operands the groups split the contraction dimension instead."""
    if mat_a.dim() == 2 and mat_b.dim() == 2:
        return int(2 * mat_a.shape[0] * mat_a.shape[1] * mat_b.shape[1])
    return int(2 * out_val.numel() * mat_a.shape[-1])


def _tokens(input: torch.Tensor) -> int:
    # (T, B, F), (B, T, F) or a packed (tokens, F): every position meets every weight once
    return input.numel() // input.shape[-1] if input.dim() else 0


# Fused recurrent kernels (oneDNN on the CPU, cuDNN on the GPU) have no formula: a real forward
# of an LSTM counted 0 where meta, which runs it step by step, counts every matmul.
@formula("mkldnn_rnn_layer")
def _mkldnn_rnn_layer_flops(
    input: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, *args: Any, **kwargs: Any
) -> int:
    """One layer, one direction: the input and hidden projections at every step (as the
    step-by-step matmuls count them: two flops a multiply-add, biases not counted)."""
    return 2 * _tokens(input) * (w_ih.numel() + w_hh.numel())


@formula("_cudnn_rnn")
def _cudnn_rnn_flops(input: torch.Tensor, weights: Any, *args: Any, **kwargs: Any) -> int:
    """Every layer and direction at once: each weight matrix meets every position once."""
    matrices = [w for w in weights if isinstance(w, torch.Tensor) and w.dim() == 2]
    return 2 * _tokens(input) * sum(w.numel() for w in matrices)


@formula("linear")  # reaches dispatch whole only for nested inputs
def _linear_flops(input: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    """``F.linear`` kept whole (a nested input: a dense one decomposes into a counted matmul):
    every input row meets the weight once."""
    elements = sum(part.numel() for part in input.unbind()) if input.is_nested else input.numel()
    return 2 * elements * weight.shape[0]


@formula("_trilinear")  # nn.Bilinear
def _trilinear_flops(
    i1: torch.Tensor,
    i2: torch.Tensor,
    i3: torch.Tensor,
    expand1: Sequence[int],
    expand2: Sequence[int],
    expand3: Sequence[int],
    *args: Any,
    **kwargs: Any,
) -> int:
    """``nn.Bilinear``: one multiply-add per point of the three inputs' joint index space
    (batch x out x in1 x in2), two flops each."""
    shapes: list[list[int]] = []
    for tensor, expand in ((i1, expand1), (i2, expand2), (i3, expand3)):
        shape = [int(size) for size in tensor.shape]
        for dim in sorted(expand):
            shape.insert(dim, 1)
        shapes.append(shape)
    joint = [max(sizes) for sizes in zip(*shapes, strict=True)]  # same rank once expanded
    return int(2 * math.prod(joint))


def matmul_flops(func: Any, args: tuple[Any, ...]) -> int | None:
    """The commonest formulas, without torch's per-call argument flattening (same numbers)."""
    if func is aten.addmm.default:
        left, right = args[1], args[2]
    elif func is aten.mm.default:
        left, right = args[0], args[1]
    elif func is aten.bmm.default:
        left, right = args[0], args[1]
        return int(2 * left.shape[0] * left.shape[1] * left.shape[2] * right.shape[2])
    else:
        return None
    return int(2 * left.shape[0] * left.shape[1] * right.shape[1])
