"""The meta shortcuts must build exactly what torch's own meta kernels build."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_modelhooks.tracing.dispatch import _BROADCASTING, TraceMode, _fast_meta
from pytest_modelhooks.tracing.flops import matmul_flops as _matmul_flops
from pytest_modelhooks.tracing.shortcuts import module_shortcut

aten = torch.ops.aten


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype)


def layout(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Shape, dtype and the strides of the dims longer than one: the strides of size-1 dims
    differ between torch's own kernels (a relu keeps them, a TensorIterator op need not) and
    change no shape, view or later result."""
    strides = tuple(stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True) if size != 1)
    return tensor.shape, strides, tensor.dtype


CASES: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = [
    (aten.relu.default, (meta(2, 3, 4),), {}),
    (aten.gelu.default, (meta(2, 5),), {"approximate": "tanh"}),
    (aten.silu.default, (meta(3, 7, dtype=torch.bfloat16),), {}),
    (aten.tanh.default, (meta(4),), {}),
    (aten.sigmoid.default, (meta(1, 1),), {}),
    (aten.hardtanh.default, (meta(2, 2), -1.0, 1.0), {}),
    (aten.leaky_relu.default, (meta(2, 8), 0.2), {}),
    (aten.elu.default, (meta(5, 3),), {}),
    (
        aten.hardswish.default,
        (
            meta(
                6,
            ),
        ),
        {},
    ),
    (aten.mish.default, (meta(2, 2, 2),), {}),
    (aten.softplus.default, (meta(3, 3), 1.0, 20.0), {}),
    (aten.clone.default, (meta(3, 4),), {}),
    (aten.addmm.default, (meta(8), meta(3, 5), meta(5, 8)), {}),
    (aten.addmm.default, (meta(3, 8), meta(3, 5), meta(5, 8)), {"beta": 0.5}),
    (aten.addmm.default, (meta(8), meta(3, 5), meta(8, 5).t()), {}),  # F.linear's transposed weight
    (aten.mm.default, (meta(3, 5), meta(5, 2)), {}),
    (aten.bmm.default, (meta(4, 5, 3).transpose(1, 2), meta(4, 5, 6)), {}),
    (aten.bmm.default, (meta(4, 3, 5), meta(4, 5, 6)), {}),
    (aten.add.Tensor, (meta(2, 3), meta(2, 3)), {"alpha": 2}),
    (aten.mul.Tensor, (meta(2, 3, dtype=torch.float16), meta(2, 3, dtype=torch.float16)), {}),
    (aten.sub.Tensor, (meta(4, 1), meta(4, 1)), {}),
    (
        aten._native_batch_norm_legit_no_training.default,
        (meta(2, 3, 4, 4), meta(3), meta(3), meta(3), meta(3), 0.1, 1e-5),
        {},
    ),
    (
        aten.native_batch_norm.default,
        (meta(2, 3, 4, 4), meta(3), meta(3), meta(3), meta(3), False, 0.1, 1e-5),
        {},
    ),
    (aten.native_batch_norm.default, (meta(5, 3), None, None, None, None, True, 0.1, 1e-5), {}),
    (aten.native_layer_norm.default, (meta(2, 5, 8), [8], meta(8), meta(8), 1e-5), {}),
    (aten.native_layer_norm.default, (meta(2, 5, 8), [5, 8], None, None, 1e-5), {}),
    # what attention, RMSNorm and rotary embeddings decompose into
    (aten.rsqrt.default, (meta(2, 5, 1),), {}),
    (aten.neg.default, (meta(3, dtype=torch.bfloat16),), {}),
    (aten.exp.default, (meta(2, 2),), {}),
    (aten.mul.Scalar, (meta(1, 12, 16, 64), 0.125), {}),
    (aten.add.Scalar, (meta(4, 4), 1), {"alpha": 2}),
    (aten.div.Scalar, (meta(4, 4, dtype=torch.float16), 3.0), {}),
    (aten.pow.Tensor_Scalar, (meta(2, 16, 64), 2), {}),
    (aten.add.Tensor, (meta(2, 3), meta(3)), {}),
    (aten.add.Tensor, (meta(1, 12, 16, 16), meta(1, 1, 16, 16)), {"alpha": 0.5}),
    (aten.mul.Tensor, (meta(2, 16, 64), meta(2, 16, 1)), {}),
    (aten.mul.Tensor, (meta(16, 1), meta(1, 64)), {}),
    (aten.div.Tensor, (meta(3, 1, 5), meta(4, 1)), {}),
    (aten.sub.Tensor, (meta(5, 0, 2), meta(1, 2)), {}),
    (
        aten.where.self,
        (meta(16, 16, dtype=torch.bool), meta(1, 12, 16, 16), meta(dtype=torch.float32)),
        {},
    ),
    (aten.masked_fill.Scalar, (meta(2, 4, 8, 8), meta(8, 8, dtype=torch.bool), float("-inf")), {}),
    (aten._softmax.default, (meta(2, 4, 8, 8), -1, False), {}),
    (aten._log_softmax.default, (meta(2, 10), 1, False), {}),
    (aten._safe_softmax.default, (meta(1, 12, 16, 16), -1), {}),
    (aten.tril.default, (meta(16, 16, dtype=torch.bool),), {}),
    (aten.triu.default, (meta(3, 16, 16), 1), {}),
    (aten.mean.dim, (meta(2, 16, 64), [-1], True), {}),
    (aten.mean.dim, (meta(2, 3, 8, 8), [2, 3]), {}),
    (aten.cat.default, ([meta(2, 3, 4), meta(2, 5, 4)], 1), {}),
    (aten.cat.default, ([meta(2, 8, 32), meta(2, 8, 32)], -1), {}),
]


def flat(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize(("func", "args", "kwargs"), CASES, ids=[str(case[0]) for case in CASES])
def test_shortcut_matches_torch_meta_kernel(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    fast = _fast_meta(func, args, kwargs)
    assert fast is not None, "the shortcut should handle this case"
    slow = func(*args, **kwargs)
    for mine, theirs in zip(flat(fast), flat(slow), strict=True):
        assert (mine.shape, mine.stride(), mine.dtype, mine.device) == (
            theirs.shape,
            theirs.stride(),
            theirs.dtype,
            theirs.device,
        )


@pytest.mark.parametrize(
    ("func", "args"),
    [
        (aten.relu.default, (meta(4, 1).expand(4, 3),)),  # a zero stride: torch's own choice
        (aten.addmm.default, (meta(8, dtype=torch.float16), meta(3, 5), meta(5, 8))),  # mixed dtypes
        (aten.add.Tensor, (meta(2, 3), meta(4))),  # does not broadcast
        (aten.add.Tensor, (meta(2, 3), torch.empty(2, 3))),  # a CPU tensor: torch's device error
        (aten.add.Tensor, (meta(2, 3), meta(2, 3, dtype=torch.float64))),  # type promotion
        (aten.mul.Tensor, (meta(2, 3, dtype=torch.int64), meta(2, 3, dtype=torch.int64))),  # not float
        (aten.mul.Scalar, (meta(2, 3), 1j)),  # complex promotes
        (aten.rsqrt.default, (meta(2, 3, dtype=torch.int64),)),  # int promotes to float
        (aten.gelu.default, (meta(2, 3, dtype=torch.int64),)),  # torch refuses integers
        (aten.where.self, (meta(2, 3), meta(2, 3), meta(2, 3))),  # condition not bool
        (aten.masked_fill.Scalar, (meta(2, 3), meta(4, 3, dtype=torch.bool), 0.0)),  # mask too big
        (aten._softmax.default, (meta(2, 3), 2, False)),  # dim out of range
        (aten._softmax.default, (meta(2, 3, dtype=torch.float16), 1, True)),  # half to float
        (aten.tril.default, (meta(3),)),  # needs two dims
        (aten.mean.dim, (meta(2, 3), [1, -1])),  # the same dim twice
        (aten.cat.default, ([meta(2, 3), meta(3, 3)], 1)),  # sizes differ off the cat dim
        (aten.cat.default, ([meta(2, 3), meta(2, 3, dtype=torch.float16)], 0)),
        (aten.addmm.default, (meta(8), meta(3, 5), meta(6, 8))),  # inner dims differ
        (aten.addmm.default, (meta(7), meta(3, 5), meta(5, 8))),  # bias does not broadcast
        (aten.mm.default, (meta(3, 5), meta(4, 2))),
        (aten.bmm.default, (meta(4, 3, 5), meta(2, 5, 6))),
        (aten.bmm.default, (meta(4, 3, 5), meta(4, 4, 6))),
        (aten.native_batch_norm.default, (meta(2, 3, 4), meta(4), meta(4), None, None, True, 0.1, 1e-5)),
        (aten.native_layer_norm.default, (meta(2, 5, 8), [7], None, None, 1e-5)),
        (aten.native_layer_norm.default, (meta(2, 5, 8), [8], meta(7), None, 1e-5)),
        (
            aten.convolution.default,
            (meta(1, 3, 8, 8), meta(4, 3, 3, 3), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1),
        ),
    ],
)
def test_unusual_cases_defer_to_torch(func: Any, args: tuple[Any, ...]) -> None:
    assert _fast_meta(func, args, {}) is None


SHAPES = st.lists(st.integers(0, 3), min_size=0, max_size=4)


@given(left=SHAPES, right=SHAPES, op=st.sampled_from(sorted(_BROADCASTING, key=str)))
@settings(max_examples=200, deadline=None)
def test_broadcasting_shortcut_builds_what_torch_builds_or_defers(
    left: list[int], right: list[int], op: Any
) -> None:
    args = (meta(*left), meta(*right))
    fast = _fast_meta(op, args, {})
    try:
        slow = op(*args)
    except RuntimeError:
        assert fast is None  # torch's error, in torch's words
        return
    assert fast is not None
    assert (fast.shape, fast.stride(), fast.dtype) == (slow.shape, slow.stride(), slow.dtype)


@st.composite
def laid_out(draw: st.DrawFn, min_rank: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A meta tensor in a drawn layout: contiguous, permuted (packed), or with gaps (sliced)."""
    shape = draw(st.lists(st.integers(1, 4), min_size=min_rank, max_size=5))
    order = draw(st.permutations(range(len(shape))))
    x = meta(*shape, dtype=dtype).permute(order)
    if draw(st.booleans()) and x.dim() and x.shape[-1] > 1:
        x = x[..., ::2]  # gaps: not packed
    return x


POINTWISE = [
    (aten.relu.default, ()),
    (aten.neg.default, ()),
    (aten.exp.default, ()),
    (aten.clone.default, ()),
    (aten.mul.Scalar, (0.5,)),
    (aten.mul.Tensor, (0.5,)),
    (aten.pow.Tensor_Scalar, (2,)),
]


@given(x=laid_out(), case=st.sampled_from(POINTWISE))
@settings(max_examples=200, deadline=None)
def test_pointwise_shortcuts_keep_torchs_strides(x: torch.Tensor, case: tuple[Any, tuple[Any, ...]]) -> None:
    op, extra = case
    fast = _fast_meta(op, (x, *extra), {})
    slow = op(x, *extra)
    if x.is_contiguous():
        assert fast is not None
    if fast is not None:
        assert layout(fast) == layout(slow)


@given(x=laid_out(), op=st.sampled_from(sorted(_BROADCASTING, key=str)), data=st.data())
@settings(max_examples=200, deadline=None)
def test_binary_shortcuts_over_layouts_match_torch(x: torch.Tensor, op: Any, data: st.DataObject) -> None:
    # the other operand: the same shape in its own layout, or a trailing slice of it
    keep = data.draw(st.integers(0, x.dim()))
    other = data.draw(laid_out(min_rank=0)) if data.draw(st.booleans()) else None
    if other is None or other.dim() > x.dim():
        other = meta(*x.shape[x.dim() - keep :])
    fast = _fast_meta(op, (x, other), {})
    try:
        slow = op(x, other)
    except RuntimeError:
        assert fast is None
        return
    if fast is not None:
        assert layout(fast) == layout(slow)


@given(
    condition=laid_out(min_rank=0, dtype=torch.bool),
    left=laid_out(min_rank=0),
    right=laid_out(min_rank=0),
)
@settings(max_examples=200, deadline=None)
def test_where_shortcut_over_layouts_matches_torch(
    condition: torch.Tensor, left: torch.Tensor, right: torch.Tensor
) -> None:
    args = (condition, left, right)
    fast = _fast_meta(aten.where.self, args, {})
    try:
        slow = aten.where.self(*args)
    except RuntimeError:
        assert fast is None
        return
    if fast is not None:
        assert layout(fast) == layout(slow)


def test_pointwise_shortcut_answers_a_transposed_tensor_and_contiguous_clones() -> None:
    x = meta(2, 12, 16, 64).transpose(1, 2)  # attention's (batch, tokens, heads, dim) view
    out = _fast_meta(aten.mul.Scalar, (x, 0.125), {})
    assert out is not None and out.stride() == x.stride()
    # a head's slice of a fused q/k/v projection, as GPT-2 makes it: a transpose with gaps
    q = meta(1, 128, 3 * 768)[..., :768].view(1, 128, 12, 64).transpose(1, 2)
    scaled = _fast_meta(aten.mul.Scalar, (q, 0.125), {})
    assert scaled is not None and layout(scaled) == layout(aten.mul.Scalar(q, 0.125))
    clone = _fast_meta(aten.clone.default, (x,), {"memory_format": torch.contiguous_format})
    assert clone is not None and clone.is_contiguous()
    assert _fast_meta(aten.clone.default, (meta(2, 3, 4, 4),), {"memory_format": torch.channels_last}) is None


@given(
    parts=st.integers(1, 3),
    rank=st.integers(1, 5),
    data=st.data(),
)
@settings(max_examples=200, deadline=None)
def test_cat_shortcut_builds_what_torch_builds(parts: int, rank: int, data: st.DataObject) -> None:
    shape = data.draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank))
    dim = data.draw(st.integers(-rank, rank - 1))
    dtypes = st.sampled_from([torch.float32, torch.bfloat16])
    dtype = data.draw(dtypes)
    tensors = []
    for _ in range(parts):
        own = list(shape)
        own[dim] = data.draw(st.integers(1, 3))
        order = data.draw(st.permutations(range(rank)))
        inverse = sorted(range(rank), key=order.__getitem__)
        # the logical shape ``own`` in a drawn memory order
        tensors.append(meta(*[own[axis] for axis in order], dtype=dtype).permute(*inverse))
    if data.draw(st.booleans()):  # an empty cache, whose dtype still counts
        empty = meta(0, dtype=data.draw(dtypes))
        tensors.insert(data.draw(st.integers(0, len(tensors))), empty)
    fast = _fast_meta(aten.cat.default, (tensors, dim), {})
    slow = aten.cat.default(tensors, dim)
    kept = [tensor for tensor in tensors if tensor.shape != (0,)]
    same_dtype = all(tensor.dtype == dtype for tensor in tensors)
    if same_dtype and (rank not in (4, 5) or all(tensor.stride(1) > tensor.stride(-1) for tensor in kept)):
        assert fast is not None
    if fast is not None:
        assert layout(fast) == layout(slow)


def test_trace_mode_counts_flops_with_torchs_formulas() -> None:
    counts: list[int] = []
    with TraceMode(fast_meta=True, flops_sink=counts.append):
        torch.nn.functional.linear(meta(3, 5), meta(8, 5), meta(8))
    assert counts == [2 * 3 * 5 * 8]


@pytest.mark.parametrize(
    ("func", "args"),
    [
        (aten.addmm.default, (meta(8), meta(3, 5), meta(5, 8))),
        (aten.mm.default, (meta(7, 5), meta(5, 2))),
        (aten.bmm.default, (meta(4, 3, 5), meta(4, 5, 6))),
    ],
)
def test_matmul_flops_equal_torchs_formula(func: Any, args: tuple[Any, ...]) -> None:
    from torch.utils.flop_counter import flop_registry

    out = func(*args)
    assert _matmul_flops(func, args) == flop_registry[func._overloadpacket](*args, out_val=out)


# --------------------------------------------------------------------------- grouped matmul (MoE)

_OFFS = torch.tensor([2, 5, 8], dtype=torch.int32)
GROUPED = [  # (tokens, K) x (experts, K, N); (G, M, K) x (G, K, N); K split; N split
    pytest.param((8, 16), (3, 16, 24), _OFFS, id="2d-3d"),
    pytest.param((3, 8, 16), (3, 16, 24), None, id="3d-3d"),
    pytest.param((8, 32), (32, 24), torch.tensor([8, 16, 32], dtype=torch.int32), id="2d-2d"),
    pytest.param((3, 8, 16), (16, 48), torch.tensor([16, 32, 48], dtype=torch.int32), id="3d-2d"),
]
needs_grouped_mm = pytest.mark.skipif(
    not hasattr(aten, "_grouped_mm"), reason="torch < 2.8 has no grouped matmul"
)


@needs_grouped_mm
@pytest.mark.parametrize(("a", "b", "offs"), GROUPED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_builds_what_the_cpu_kernel_builds(a: Any, b: Any, offs: Any, dtype: torch.dtype) -> None:
    # torch's meta kernel takes bfloat16 only; the CPU kernel (the reference here) takes float32
    real = aten._grouped_mm(torch.randn(a, dtype=dtype), torch.randn(b, dtype=dtype), offs)
    on_meta = None if offs is None else offs.to("meta")
    fast = _fast_meta(aten._grouped_mm.default, (meta(*a, dtype=dtype), meta(*b, dtype=dtype), on_meta), {})
    assert fast is not None and layout(fast) == layout(real)
    if dtype == torch.bfloat16:
        assert layout(fast) == layout(aten._grouped_mm(meta(*a, dtype=dtype), meta(*b, dtype=dtype), on_meta))


@needs_grouped_mm
@pytest.mark.parametrize(
    ("a", "b", "offs", "kwargs"),
    [
        ((8, 16), (3, 17, 24), _OFFS, {}),  # contraction mismatch
        ((8, 16), (4, 16, 24), _OFFS, {}),  # 3 groups, 4 experts
        ((8, 16), (3, 16, 24), None, {}),  # a 2-D operand needs offsets
        ((3, 8, 16), (3, 16, 24), _OFFS, {}),  # 3-D x 3-D takes none
        ((8, 16), (3, 16, 24), _OFFS.long(), {}),  # int64 offsets
        ((8, 16), (3, 16, 24), _OFFS, {"bias": meta(24)}),
    ],
)
def test_invalid_grouped_mm_defers_to_torch(a: Any, b: Any, offs: Any, kwargs: dict[str, Any]) -> None:
    args = (meta(*a), meta(*b), None if offs is None else offs.to("meta"))
    assert _fast_meta(aten._grouped_mm.default, args, kwargs) is None


@needs_grouped_mm
@pytest.mark.parametrize(("a", "b", "offs"), GROUPED)
def test_grouped_mm_flops_are_the_sum_of_its_matmuls(a: Any, b: Any, offs: Any) -> None:
    from pytest_modelhooks.tracing.flops import formulas as _flop_registry

    left, right = torch.randn(a), torch.randn(b)
    out = aten._grouped_mm(left, right, offs)
    ends = offs.tolist() if offs is not None else list(range(1, a[0] + 1))
    starts = [0, *ends[:-1]]
    if len(a) == 2 and len(b) == 3:  # each expert multiplies its own tokens
        expected = sum(2 * (end - start) * a[1] * b[2] for start, end in zip(starts, ends, strict=True))
    elif len(a) == 2:  # each group its own slice of K
        expected = sum(2 * a[0] * (end - start) * b[1] for start, end in zip(starts, ends, strict=True))
    elif len(b) == 2:  # each group its own slice of N
        expected = sum(2 * a[1] * a[2] * (end - start) for start, end in zip(starts, ends, strict=True))
    else:
        expected = 2 * a[0] * a[1] * a[2] * b[2]
    formula = _flop_registry()[aten._grouped_mm]
    assert formula(left, right, offs, out_val=out) == expected


# --------------------------------------------------------------------------- module shortcuts

SHORTCUT_MODULES: list[tuple[torch.nn.Module, torch.Tensor]] = [
    (torch.nn.Linear(5, 8), meta(3, 5)),
    (torch.nn.Linear(5, 8, bias=False), meta(2, 4, 5)),
    (torch.nn.Linear(5, 8, dtype=torch.bfloat16), meta(6, 5, dtype=torch.bfloat16)),
    (torch.nn.ReLU(), meta(2, 3, 4)),
    (torch.nn.GELU(approximate="tanh"), meta(2, 5)),
    (torch.nn.SiLU(), meta(7)),
    (torch.nn.Tanh(), meta(1, 1)),
    (torch.nn.Sigmoid(), meta(4, 2, dtype=torch.float16)),
]


def run_plainly(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    counts: list[int] = []
    with TraceMode(fast_meta=False, flops_sink=counts.append), torch.no_grad():
        out = module(x)
    return out, counts


@pytest.mark.parametrize(("module", "x"), SHORTCUT_MODULES, ids=[repr(case[0]) for case in SHORTCUT_MODULES])
def test_module_shortcut_builds_what_the_module_would(module: torch.nn.Module, x: torch.Tensor) -> None:
    module = module.to("meta")
    expected, expected_flops = run_plainly(module, x)
    counts: list[int] = []
    forward = module_shortcut(module, counts.append)
    assert forward is not None
    with TraceMode(fast_meta=True, flops_sink=counts.append):  # must not be consulted
        out = forward(x)
    assert (out.shape, out.stride(), out.dtype, out.device) == (
        expected.shape,
        expected.stride(),
        expected.dtype,
        expected.device,
    )
    assert sum(counts) == sum(expected_flops)


def test_in_place_activations_identity_and_eval_dropout_return_their_input() -> None:
    x = meta(2, 3)
    for module in (torch.nn.ReLU(inplace=True), torch.nn.SiLU(inplace=True), torch.nn.Identity()):
        forward = module_shortcut(module, None)
        assert forward is not None and forward(x) is x
    dropout = torch.nn.Dropout(0.5).eval()
    forward = module_shortcut(dropout, None)
    assert forward is not None and forward(x) is x


class OwnLinear(torch.nn.Linear):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) * 2


def test_modules_with_their_own_forward_get_no_shortcut() -> None:
    assert module_shortcut(OwnLinear(2, 3), None) is None
    assert module_shortcut(torch.nn.Conv2d(1, 1, 1), None) is None
    patched = torch.nn.ReLU()
    patched.forward = lambda x: x  # type: ignore[method-assign]  # e.g. a library's wrapper
    assert module_shortcut(patched, None) is None


def test_unusual_calls_run_the_real_forward() -> None:
    linear = torch.nn.Linear(5, 8, device="meta")
    forward = module_shortcut(linear, None)
    assert forward is not None
    with pytest.raises(RuntimeError) as ours, torch.no_grad():
        forward(meta(3, 4))
    with pytest.raises(RuntimeError) as torchs, torch.no_grad():
        torch.nn.functional.linear(meta(3, 4), linear.weight, linear.bias)
    assert str(ours.value) == str(torchs.value)
    transposed = meta(5, 3).t()  # not contiguous: the real forward decides the strides
    assert forward(transposed).stride() == torch.nn.functional.linear(transposed, linear.weight).stride()
    dropout = torch.nn.Dropout(0.5).train()
    forward = module_shortcut(dropout, None)
    assert forward is not None
    x = meta(4, 4)
    assert forward(x) is not x  # training-mode dropout is a real op
    relu = module_shortcut(torch.nn.ReLU(), None)
    assert relu is not None  # a CPU tensor gets torch's forward, values and all
    assert relu(torch.tensor([-1.0, 2.0])).tolist() == [0.0, 2.0]


@pytest.mark.parametrize(
    ("func", "args"),
    [
        (aten.mm.default, (meta(3, 5, dtype=torch.bfloat16), meta(5, 2))),
        (aten.addmm.default, (meta(2), meta(3, 5), meta(5, 2, dtype=torch.float16))),
        (
            aten.convolution.default,
            (
                meta(1, 3, 8, 8, dtype=torch.bfloat16),
                meta(4, 3, 3, 3),
                None,
                [1, 1],
                [0, 0],
                [1, 1],
                False,
                [0, 0],
                1,
            ),
        ),
    ],
)
def test_mixed_dtypes_fail_on_meta_as_on_a_real_kernel(func: Any, args: tuple[Any, ...]) -> None:
    # torch's meta kernels let these through; a CPU or CUDA kernel raises
    real = tuple(
        torch.zeros(arg.shape, dtype=arg.dtype) if isinstance(arg, torch.Tensor) else arg for arg in args
    )
    with pytest.raises(RuntimeError):
        func(*real)
    with TraceMode(fast_meta=True, flops_sink=None), pytest.raises(RuntimeError, match="same dtype"):
        func(*args)
