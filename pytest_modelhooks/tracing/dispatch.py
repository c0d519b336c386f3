"""Fast meta shapes and per-call multiply-adds for traced forwards.

:class:`TraceMode` has two jobs, both at the ATen level where every module's work ends up:

* On the meta engine, answer the commonest ops (matmuls, pointwise and broadcasting
  arithmetic, activations, eval-mode norms, and what attention decomposes into on meta:
  softmax, causal masks, ``where``, ``cat``) by building the output directly. torch's own meta
  kernels for these go through Python decompositions that cost ~0.1-0.7 ms per op, more than
  the op itself on a batch of one; the shortcut's outputs are checked against those kernels
  (shape, strides, dtype) in the tests.
  Anything unusual (mismatched shapes, mixed dtypes, odd strides, other ops) goes to torch's
  kernel, so that errors read exactly as torch's do.
* Count flops with torch's own formulas (``torch.utils.flop_counter``) and hand each count to
  a sink, which attributes it to the module call that is running. This replaces
  ``FlopCounterMode``, whose module tracker costs more than the forward on deep models.

One level higher, at the module, :mod:`pytest_modelhooks.tracing.shortcuts` gives the layers
that dominate deep stacks of small modules (``nn.Linear``, the common activations,
``Identity``, eval ``Dropout``) a stand-in ``forward`` that builds the output directly: one
Python call per layer instead of two or three trips through the dispatch mode (~15 us each),
and the same answer from a shape and dtype alone, for runs of such layers inside an
``nn.Sequential``. Flop formulas are in :mod:`pytest_modelhooks.tracing.flops`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pytest_modelhooks._torch import TorchDispatchMode, no_python_dispatch, overload_packet
from pytest_modelhooks.tracing.flops import formulas, matmul_flops

aten = torch.ops.aten


Handler = Callable[[tuple[Any, ...], dict[str, Any]], Any]


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


_NUMBER = (int, float)  # Python scalars that keep a floating tensor's dtype (not complex, not bool)


def _dense(tensor: Any) -> bool:
    """A meta tensor laid out contiguously: the layout every shortcut's output takes."""
    return type(tensor) is torch.Tensor and tensor.is_meta and tensor.is_contiguous()


def _canonical(tensor: torch.Tensor) -> bool:
    """Contiguous with the strides ``torch.empty`` gives, size-1 dims included: a broadcast
    output's layout follows its inputs' strides, those of their size-1 dims too."""
    expected = 1
    for size, stride in zip(reversed(tensor.shape), reversed(tensor.stride()), strict=True):
        if stride != expected:
            return False
        expected *= max(size, 1)
    return True


def _dense_float(tensor: Any) -> bool:
    return _dense(tensor) and tensor.dtype in _FLOATS


def _empty(shape: Any, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _broadcasts(shape: tuple[int, ...] | torch.Size, target: tuple[int, ...]) -> bool:
    if len(shape) > len(target):
        return False
    return all(dim in (1, goal) for dim, goal in zip(reversed(shape), reversed(target), strict=False))


def _broadcast_shape(*shapes: torch.Size) -> tuple[int, ...] | None:
    """The shape ``shapes`` broadcast to, or None where they do not (torch then says why)."""
    rank = max(len(shape) for shape in shapes)
    out: list[int] = []
    for axis in range(-rank, 0):
        size = 1
        for shape in shapes:
            if -axis > len(shape):
                continue
            dim = shape[axis]
            if dim == 1:
                continue
            if size == 1:
                size = dim
            elif dim != size:
                return None
        out.append(size)
    return tuple(out)


def _dim_ok(dim: Any, rank: int) -> bool:
    return type(dim) is int and -max(rank, 1) <= dim < max(rank, 1)


# Pointwise ops whose output has a floating input's shape and dtype (torch refuses some of
# them for integers: that error is torch's to raise).
_UNARY = {
    aten.relu.default,
    aten.gelu.default,
    aten.silu.default,
    aten.tanh.default,
    aten.sigmoid.default,
    aten.hardtanh.default,
    aten.leaky_relu.default,
    aten.elu.default,
    aten.hardswish.default,
    aten.mish.default,
    aten.softplus.default,
}


# ... and with no other argument (integer inputs would promote to float).
_FLOAT_UNARY = {
    aten.rsqrt.default,
    aten.sqrt.default,
    aten.exp.default,
    aten.log.default,
    aten.neg.default,
    aten.sin.default,
    aten.cos.default,
    aten.reciprocal.default,
}


# tensor (op) Python number: the tensor's dtype for a floating tensor
_WITH_SCALAR = {
    aten.mul.Scalar,
    aten.add.Scalar,
    aten.sub.Scalar,
    aten.div.Scalar,
    aten.pow.Tensor_Scalar,
}


_BROADCASTING = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor}


def _pointwise_out(x: Any) -> torch.Tensor | None:
    """What a pointwise op on meta tensor ``x`` alone returns, or None where torch's choice is
    not plain (dims of equal or zero stride).

    torch lays the output out densely in the order of ``x``'s strides: contiguous for a
    contiguous ``x``, the same strides for a transpose, the transpose's layout without the
    gaps for a slice of a fused projection. (Strides of size-1 dims are left as they fall:
    torch's kernels disagree among themselves there, and they change no shape and no later
    op's result.)
    """
    if type(x) is not torch.Tensor or not x.is_meta:
        return None
    if x.is_contiguous():
        return _empty(x.shape, x)
    if not x.numel():
        return None
    shape = x.shape
    order = sorted((stride, axis) for axis, stride in enumerate(x.stride()) if shape[axis] != 1)
    strides = [0] * len(shape)
    previous, dense = 0, 1
    for stride, axis in order:
        if stride <= previous:
            return None
        previous = stride
        strides[axis] = dense
        dense *= shape[axis]
    for axis, size in enumerate(shape):
        if size == 1:
            strides[axis] = dense
    return torch.empty_strided(shape, strides, dtype=x.dtype, device=x.device)


def _unary(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = args[0]
    if type(x) is torch.Tensor and x.dtype in _FLOATS and kwargs.get("memory_format") is None:
        return _pointwise_out(x)
    return None


def _clone(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = args[0]
    layout = kwargs.get("memory_format")
    if layout is None:
        return _pointwise_out(x)  # any dtype
    if layout is torch.contiguous_format and _meta(x):  # .contiguous() of a transposed view
        return _empty(x.shape, x)
    return None


def _float_unary(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = args[0]
    if len(args) == 1 and not kwargs and type(x) is torch.Tensor and x.dtype in _FLOATS:
        return _pointwise_out(x)
    return None


def _with_scalar(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x, other = args[0], args[1]
    if (
        type(x) is torch.Tensor
        and x.dtype in _FLOATS
        and type(other) in _NUMBER
        and all(type(value) in _NUMBER for value in (*args[2:], *kwargs.values()))
    ):
        return _pointwise_out(x)
    return None


def _broadcasting(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    left, right = args[0], args[1]
    if type(right) in _NUMBER:  # x * 0.5 reaches the .Tensor overload with a Python number
        return _with_scalar(args, kwargs)
    if not (_dense_float(left) and _dense(right) and left.dtype == right.dtype):
        return None
    if any(type(value) not in _NUMBER for value in (*args[2:], *kwargs.values())):  # alpha=
        return None
    if left.shape == right.shape:
        return _empty(left.shape, left)
    if not (_canonical(left) and _canonical(right)):
        return None
    shape = _broadcast_shape(left.shape, right.shape)
    return None if shape is None else _empty(shape, left)


def _where(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    condition, left, right = args
    if not (
        _dense(condition)
        and condition.dtype is torch.bool
        and _dense(left)
        and _dense(right)
        and left.dtype == right.dtype
    ):
        return None
    if not (condition.shape == left.shape == right.shape) and not (
        _canonical(condition) and _canonical(left) and _canonical(right)
    ):
        return None
    shape = _broadcast_shape(condition.shape, left.shape, right.shape)
    return None if shape is None else _empty(shape, left)


def _masked_fill(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x, mask, value = args
    if (
        _dense_float(x)
        and _dense(mask)
        and mask.dtype is torch.bool
        and type(value) in _NUMBER
        and _broadcasts(mask.shape, tuple(x.shape))
    ):
        return _empty(x.shape, x)
    return None


def _softmax(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # _softmax/_log_softmax(x, dim, half_to_float); _safe_softmax(x, dim, dtype=None)
    x, dim = args[0], args[1]
    rest = [*args[2:], *kwargs.values()]
    if _dense_float(x) and _dim_ok(dim, x.dim()) and all(value in (None, False) for value in rest):
        return _empty(x.shape, x)
    return None


def _triangle(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = args[0]
    diagonal = [*args[1:], *kwargs.values()]
    if _dense(x) and x.dim() >= 2 and all(type(value) is int for value in diagonal):
        return _empty(x.shape, x)
    return None


def _mean(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # mean.dim(x, dim, keepdim=False, *, dtype=None)
    x, dims = args[0], args[1]
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if (
        not _dense_float(x)
        or x.dim() == 0
        or kwargs.get("dtype") is not None
        or type(keepdim) is not bool
        or not isinstance(dims, (list, tuple))
        or not dims
        or not all(_dim_ok(dim, x.dim()) for dim in dims)
    ):
        return None
    reduced = {dim % x.dim() for dim in dims}
    if len(reduced) != len(dims):
        return None  # a repeated dim: torch's error
    if keepdim:
        shape = [1 if axis in reduced else size for axis, size in enumerate(x.shape)]
    else:
        shape = [size for axis, size in enumerate(x.shape) if axis not in reduced]
    return _empty(shape, x)


def _same_but(shape: torch.Size, other: torch.Size, axis: int) -> bool:
    return shape[:axis] == other[:axis] and shape[axis + 1 :] == other[axis + 1 :]


def _cat(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    given = args[0]
    if not given or not all(_meta(tensor) for tensor in given):
        return None
    # torch skips 1-d empty tensors (an empty cache to append to), but not their dtype
    if any(tensor.dtype != given[0].dtype for tensor in given):
        return None
    tensors = [tensor for tensor in given if tensor.shape != (0,)]
    if not tensors:
        return None
    first = tensors[0]
    rank = first.dim()
    if rank == 0 or not _dim_ok(dim, rank):
        return None
    axis = dim % rank
    total = 0
    for tensor in tensors:
        if (
            tensor.dim() != rank
            # The output is contiguous unless every input suggests channels-last; a channel
            # stride above the last dim's rules that out (any layout torch would call so).
            or (rank in (4, 5) and not tensor.stride(1) > tensor.stride(-1))
            or not _same_but(tensor.shape, first.shape, axis)
        ):
            return None
        total += tensor.shape[axis]
    shape = list(first.shape)
    shape[axis] = total
    return _empty(shape, first)


def _addmm(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    bias, left, right = args[:3]
    # any strides: the output is contiguous (F.linear passes the weight transposed)
    if _meta(bias) and _meta(left) and _meta(right) and left.dtype == right.dtype == bias.dtype:
        out = _matmul_shape(left, right, rank=2)
        if out is not None and _broadcasts(bias.shape, out):
            return _empty(out, left)
    return None


def _matmul_shape(left: torch.Tensor, right: torch.Tensor, rank: int) -> tuple[int, ...] | None:
    """The output shape of mm (``rank`` 2) or bmm (3, one batch size), or None."""
    if (
        left.dim() == rank
        and right.dim() == rank
        and left.shape[:-2] == right.shape[:-2]
        and left.shape[-1] == right.shape[-2]
    ):
        return (*left.shape[:-1], right.shape[-1])
    return None


def _matmul(rank: int) -> Handler:
    def handler(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        left, right = args
        if _meta(left) and _meta(right) and left.dtype == right.dtype:
            out = _matmul_shape(left, right, rank)
            return None if out is None else _empty(out, left)
        return None

    return handler


def _meta(tensor: Any) -> bool:
    return type(tensor) is torch.Tensor and tensor.is_meta


def _batch_norm(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = args[0]
    per_channel = [tensor for tensor in args[1:5] if tensor is not None]
    if (
        _dense(x)
        and x.dim() >= 2
        and x.dtype in (torch.float32, torch.float64)
        and all(_meta(tensor) and tensor.shape == (x.shape[1],) for tensor in per_channel)
    ):
        channels = (x.shape[1],)
        return (_empty(x.shape, x), _empty(channels, x), _empty(channels, x))
    return None


def _layer_norm(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x, normalized_shape = args[0], tuple(args[1])
    affine = [tensor for tensor in args[2:4] if tensor is not None]
    if (
        _dense(x)
        and x.dtype in (torch.float32, torch.float64)
        and 0 < len(normalized_shape) <= x.dim()
        and tuple(x.shape[x.dim() - len(normalized_shape) :]) == normalized_shape
        and all(_meta(tensor) and tuple(tensor.shape) == normalized_shape for tensor in affine)
    ):
        axis = x.dim() - len(normalized_shape)
        stats_shape = (*x.shape[:axis], *([1] * len(normalized_shape)))
        return (_empty(x.shape, x), _empty(stats_shape, x), _empty(stats_shape, x))
    return None


def grouped_mm_shape(
    mat_a: torch.Tensor, mat_b: torch.Tensor, offs: torch.Tensor | None
) -> tuple[int, ...] | None:
    """The output shape of ``torch._grouped_mm`` (an MoE layer's experts in one call), or None
    where the arguments are invalid. Layouts: (tokens, K) x (experts, K, N) -> (tokens, N);
    (G, M, K) x (G, K, N) -> (G, M, N); (M, K_all) x (K_all, N) -> (G, M, N);
    (G, M, K) x (K, N_all) -> (M, N_all). A 2-D operand needs 1-D int32 group offsets."""
    if mat_a.dim() not in (2, 3) or mat_b.dim() not in (2, 3):
        return None
    a_2d, b_2d = mat_a.dim() == 2, mat_b.dim() == 2
    if (a_2d or b_2d) != (offs is not None):
        return None
    if offs is not None and (offs.dim() != 1 or offs.dtype != torch.int32):
        return None
    groups = offs.shape[0] if offs is not None else mat_a.shape[0]
    shape: tuple[int, ...] | None
    if a_2d and b_2d:
        shape = (groups, mat_a.shape[0], mat_b.shape[1]) if mat_a.shape[1] == mat_b.shape[0] else None
    elif a_2d:
        valid = mat_a.shape[1] == mat_b.shape[1] and groups == mat_b.shape[0]
        shape = (mat_a.shape[0], mat_b.shape[2]) if valid else None
    elif b_2d:
        valid = mat_a.shape[2] == mat_b.shape[0] and groups == mat_a.shape[0]
        shape = (mat_a.shape[1], mat_b.shape[1]) if valid else None
    else:
        valid = mat_a.shape[0] == mat_b.shape[0] and mat_a.shape[2] == mat_b.shape[1]
        shape = (mat_a.shape[0], mat_a.shape[1], mat_b.shape[2]) if valid else None
    return None if shape is None else tuple(int(size) for size in shape)


def grouped_mm_output(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The output of ``torch._grouped_mm`` built from the shapes (on the operands' device: meta
    or fake), for any floating dtype the two operands share; None where the arguments are not
    the plain case (a bias, another output dtype, invalid shapes): torch's kernel answers."""
    names = ("mat_a", "mat_b", "offs", "bias", "out_dtype")
    bound = {**dict(zip(names, args, strict=False)), **kwargs}
    mat_a: Any = bound.get("mat_a")
    mat_b: Any = bound.get("mat_b")
    offs: Any = bound.get("offs")
    if not (isinstance(mat_a, torch.Tensor) and isinstance(mat_b, torch.Tensor)):
        return None
    if mat_a.dtype != mat_b.dtype or mat_a.dtype not in _FLOATS or bound.get("bias") is not None:
        return None
    if bound.get("out_dtype") not in (None, mat_a.dtype):
        return None
    shape = grouped_mm_shape(mat_a, mat_b, offs)
    return None if shape is None else _empty(shape, mat_a)


def _grouped_mm(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # torch's meta kernel checks what the CUDA kernel needs (bfloat16 only, 16-byte aligned
    # strides), so a float32 MoE model failed on meta although the CPU kernel runs it
    if not all(_meta(value) for value in [*args, *kwargs.values()] if isinstance(value, torch.Tensor)):
        return None
    return grouped_mm_output(args, kwargs)


_HANDLERS: dict[Any, Handler] = {
    **dict.fromkeys(_UNARY, _unary),
    aten.clone.default: _clone,
    **dict.fromkeys(_FLOAT_UNARY, _float_unary),
    **dict.fromkeys(_WITH_SCALAR, _with_scalar),
    **dict.fromkeys(_BROADCASTING, _broadcasting),
    aten.where.self: _where,
    aten.masked_fill.Scalar: _masked_fill,
    aten._softmax.default: _softmax,
    aten._log_softmax.default: _softmax,
    aten.tril.default: _triangle,
    aten.triu.default: _triangle,
    aten.mean.dim: _mean,
    aten.cat.default: _cat,
    aten.addmm.default: _addmm,
    aten.mm.default: _matmul(2),
    aten.bmm.default: _matmul(3),
    aten._native_batch_norm_legit_no_training.default: _batch_norm,
    aten.native_batch_norm.default: _batch_norm,
    aten.native_layer_norm.default: _layer_norm,
}


# ops newer than the oldest torch supported (2.1): registered where this torch has them
if hasattr(aten, "_safe_softmax"):  # torch >= 2.5: softmax inside attention
    _HANDLERS[aten._safe_softmax.default] = _softmax


if hasattr(aten, "_grouped_mm"):  # torch >= 2.8: mixture-of-experts layers
    _HANDLERS[aten._grouped_mm.default] = _grouped_mm


def _fast_meta(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The output of ``func`` on meta tensors, built directly, or None to defer to torch.

    Each handler answers only the plain case (meta inputs of one dtype, contiguous where the
    output's layout depends on it, valid dims) and leaves the rest, errors included, to
    torch's kernel. The tests hold every answer against torch's own meta kernel.
    """
    handler = _HANDLERS.get(func)
    return None if handler is None else handler(args, kwargs)


# torch's meta kernels for these accept mixed dtypes that every real kernel rejects (a bfloat16
# batch into a float32 Linear): check as the real kernels do, or the meta engine would pass a
# model that cannot run.
_SAME_DTYPE_OPS = {
    aten.addmm.default,
    aten.mm.default,
    aten.bmm.default,
    aten.baddbmm.default,
    aten.addmv.default,
    aten.mv.default,
    aten.dot.default,
    aten.convolution.default,
}


def _check_same_dtype(func: Any, args: tuple[Any, ...]) -> None:
    dtypes = [arg.dtype for arg in args if isinstance(arg, torch.Tensor)]
    if any(dtype != dtypes[0] for dtype in dtypes):
        first, other = dtypes[0], next(dtype for dtype in dtypes if dtype != dtypes[0])
        name = overload_packet(func).__name__
        raise RuntimeError(
            f"{name}: expected all tensors to have the same dtype, but got {first} and {other}"
        )


class TraceMode(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Dispatch mode used during a traced forward (see the module docstring)."""

    def __init__(self, *, fast_meta: bool, flops_sink: Callable[[int], None] | None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.fast_meta = fast_meta
        self.flops_sink = flops_sink
        self.formulas = formulas() if flops_sink is not None else {}

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = _fast_meta(func, args, kwargs) if self.fast_meta else None
        if out is None:
            if self.fast_meta and func in _SAME_DTYPE_OPS:
                _check_same_dtype(func, args)
            out = func(*args, **kwargs)
        if self.flops_sink is not None:
            flops = matmul_flops(func, args)
            if flops is None:
                formula = self.formulas.get(overload_packet(func))
                # torch's formulas flatten their arguments with pytree: ~50 us a call
                flops = int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0
            if flops:
                self.flops_sink(flops)
        return out


def meta_like(x: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    with no_python_dispatch():
        return torch.empty(shape, dtype=x.dtype, device=x.device)


def plain_meta(x: Any) -> bool:
    return type(x) is torch.Tensor and x.is_meta and x.is_contiguous()
