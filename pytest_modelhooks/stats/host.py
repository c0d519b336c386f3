"""The exact reductions of the CPU path, read on the host: the statistics of a CPU tensor as
Python floats (a scalar read costs ~1 us there, and no synchronisation).

A tensor larger than a core's L2 cache is reduced piece by piece (:func:`host_row`): the first
statistic of a piece reads it from memory, the rest from the cache, which is ~4x faster, and
every statistic plus the channel maxima come from one trip through memory. Smaller tensors stay
in the cache between whole passes anyway (:func:`reduce_on_host`).

>>> x = torch.tensor([[-1.0, 0.0], [3.0, 0.5]])
>>> row, maxima = host_row(x, 0.05, frozenset(STATISTICS), axis=1)  # mean, std, near zero, ...
>>> [round(value, 3) for value in row], maxima.tolist()
([0.625, 1.702, 0.25, 0.0, -1.0, 3.0], [3.0, 0.5])
"""

from __future__ import annotations

import math
import threading

import torch

from pytest_modelhooks.stats.records import STATISTICS

# Rows of this many elements keep each float32 partial sum short (accurate) while one kernel
# call still covers the whole tensor.
_ROW = 4096


_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


def _sum_of_squares(flat: torch.Tensor) -> float:
    """``sum(x * x)`` of a flat float32/float64 CPU tensor, accurate to ~1e-8 relative.

    ``torch.linalg.vector_norm`` over a whole large float32 tensor on the CPU drifts (2.5e-3
    relative at 25M elements, torch 2.13), and ``torch.var_mean`` reads at ~1.2 GB/s; norms of
    4096-element rows, summed in float64, cost the same one read as the plain norm and stay
    exact to ~1e-8.
    """
    rows = flat.numel() // _ROW
    if not rows:  # one short row: a plain dot product (no slicing: ~3 us a call on tiny layers)
        return float(torch.dot(flat, flat))
    head, tail = flat[: rows * _ROW], flat[rows * _ROW :]
    total = float(torch.dot(tail, tail)) if tail.numel() else 0.0
    if rows:
        total += float(torch.linalg.vector_norm(head.view(rows, _ROW), dim=1).double().square().sum())
    return total


# Near-zero counting runs through a reused buffer of this many elements: it stays in the core's
# L2 cache and costs no fresh allocation (page faults) per activation.
_CHUNK = 1 << 18


_scratch = threading.local()


def _buffer(slot: str, dtype: torch.dtype, size: int) -> torch.Tensor:
    """A scratch buffer of at least ``size`` elements for this thread, one per ``slot`` and
    dtype, reused so that it stays in the cache and no call pays a fresh allocation's page
    faults."""
    buffers: dict[tuple[str, torch.dtype], torch.Tensor] = _scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get((slot, dtype))
    if buffer is None or buffer.numel() < size:
        # a normal tensor even when first made under inference_mode: it is reused outside it
        with torch.inference_mode(False):
            buffer = buffers[(slot, dtype)] = torch.empty(max(size, _piece_size()), dtype=dtype)
    return buffer


def _count_near_zero(flat: torch.Tensor, eps: float) -> int:
    """How many of a flat float32/float64 CPU tensor's values have ``|x| <= eps`` (NaN never).

    ``hardshrink`` writes +0.0 exactly where ``|x| <= eps`` and passes every other value (NaN
    included) through, so counting the non-zero bit patterns (as integers: ~4x faster than
    as floats) counts the rest. Chunk by chunk through one cache-sized buffer this costs
    ~0.3 ns per value, against ~0.7 ns for ``count_nonzero(x.abs() <= eps)`` (abs, compare
    and count, each writing a full-size temporary).
    """
    if flat.numel() <= _ROW:
        # a small layer: fewer ops beat the scratch buffer (NaN stays non-zero, so uncounted)
        return flat.numel() - int(torch.count_nonzero(torch.hardshrink(flat, eps)))
    buffer = _buffer("near_zero", flat.dtype, _CHUNK)[:_CHUNK]
    as_int = buffer.view(_SAME_WIDTH_INT[flat.dtype])
    nonzero = 0
    for start in range(0, flat.numel(), _CHUNK):
        piece = flat[start : start + _CHUNK]
        size = piece.numel()
        torch.hardshrink(piece, eps, out=buffer[:size])
        nonzero += int(torch.count_nonzero(as_int[:size]))
    return flat.numel() - nonzero


def _host_flat(x: torch.Tensor) -> torch.Tensor:
    # fp16/bf16 are reduced in float32 (and compared with eps there: a Python eps rounded to
    # bfloat16 would move the threshold); float64 stays float64.
    return (x if x.dtype in _SAME_WIDTH_INT else x.float()).reshape(-1)


def _moments(x: torch.Tensor, total: float, squares: float) -> tuple[float, float, float, float]:
    """``(mean, std, non-finite count, sum of squares)`` of a CPU tensor from its sum and sum of
    squares (float32 or float64 sums of its values, as :func:`_host_flat` gives them); mean and
    std are NaN when there are non-finite values. The rare cases read ``x`` again."""
    count = x.numel()
    if not (math.isfinite(total) and math.isfinite(squares)):
        flat = _host_flat(x)
        nonfinite = float(count - int(torch.count_nonzero(torch.isfinite(flat))))
        if nonfinite:
            return math.nan, math.nan, nonfinite, squares
        # finite values whose squares overflowed: exact, in float64
        as64 = flat.double()
        std = float(as64.std()) if count > 1 else 0.0
        return float(as64.mean()), std, 0.0, float(torch.dot(as64, as64))
    mean = total / count
    variance = max(squares - total * total / count, 0.0) / max(count - 1, 1)
    # The one-pass variance loses ~1e-7 * mean^2 / variance of its precision in float32;
    # where that could exceed ~1e-6, recompute it exactly (Welford, two reads).
    if count > 1 and mean * mean > 20 * variance * (1.0 if x.dtype != torch.float64 else 1e8):
        return mean, float(_host_flat(x).std()), 0.0, squares
    return mean, math.sqrt(variance) if count > 1 else 0.0, 0.0, squares


def _host_moments(flat: torch.Tensor) -> tuple[float, float, float, float]:
    """:func:`_moments` of a flat float32/float64 CPU tensor, in two whole passes."""
    return _moments(flat, float(flat.sum()), _sum_of_squares(flat))


def host_channel_max(x: torch.Tensor, axis: int) -> torch.Tensor:
    """The maximum of each channel (dimension ``axis``) of a CPU tensor. Where each channel's
    values come in short runs (a late CNN stage, 7x7 maps) the batch is folded first, with
    contiguous elementwise maxima: 4x faster there than one reduction over the rest of the
    dimensions (2048x7x7 at batch 8: 0.10 ms against 0.39, torch 2.13); elsewhere the one
    reduction is as fast as anything."""
    after = math.prod(x.shape[axis + 1 :])
    if 1 < after < 128 and axis > 0 and x.is_contiguous():
        before = math.prod(x.shape[:axis])
        return x.view(before, x.shape[axis], after).amax(dim=0).amax(dim=1)
    return x.amax(dim=[dim for dim in range(x.dim()) if dim != axis])


def reduce_on_host(
    x: torch.Tensor,
    eps: float,
    wanted: frozenset[str] = frozenset(STATISTICS),
    channel_max: torch.Tensor | None = None,
) -> list[float]:
    """The statistics of a CPU tensor as Python floats, NaN for those not ``wanted``, in whole
    passes (:func:`host_row` takes a large tensor piece by piece). ``channel_max``, when
    given, holds ``x``'s maximum per channel (dead units need it anyway): the overall max is
    read from it instead of from ``x`` again."""
    count = x.numel()
    flat = _host_flat(x)
    mean = std = near_zero = nonfinite = low = high = math.nan
    if wanted & {"mean", "std"}:
        mean, std, nonfinite, _ = _host_moments(flat)
    elif "nonfinite" in wanted:
        nonfinite = float(count - int(torch.count_nonzero(torch.isfinite(flat))))
    if "near_zero" in wanted:
        near_zero = _count_near_zero(flat, eps) / count
    if wanted & {"min", "max"} and channel_max is not None:
        low, high = float(flat.amin()), float(channel_max.amax())
    elif wanted & {"min", "max"}:
        extremes = torch.aminmax(flat)
        low, high = float(extremes.min), float(extremes.max)
    return _masked(wanted, (mean, std, near_zero, nonfinite, low, high))


def _masked(wanted: frozenset[str], values: tuple[float, ...]) -> list[float]:
    """``values`` in :data:`STATISTICS` order, NaN for those not ``wanted``."""
    return [value if name in wanted else math.nan for name, value in zip(STATISTICS, values, strict=True)]


# Pieces of about this many elements per thread (512 KiB of float32, and as much scratch) stay
# in a core's L2 cache while each statistic reads them: a sum over 6.4M float32 takes 0.89 ms
# from memory, 0.22 ms as pieces already in L2 (torch 2.13, a 2-core Xeon with 2 MiB
# of L2 a core). Torch splits each op over its threads, so a piece holds this many a thread:
# ResNet-50's 178M recorded values at batch 8 took 257 ms in pieces of 128K on one thread
# against 322 ms in pieces of 256K, and 175 ms against 192 ms the other way round on two.
_PIECE = 1 << 17
# Threads beyond this add nothing to a piece: it keeps a piece's float32 count of values near
# zero exact (below 2**24).
_MAX_THREADS = 64
# A single run (a plane, a row of channels) longer than this is reduced in whole passes.
_MAX_RUN = 1 << 20
# Channel runs shorter than this (a late CNN stage's 7x7 maps) are folded across rows first,
# as in host_channel_max.
_SHORT_RUN = 128


def _piece_size() -> int:
    """How many elements a piece holds with torch's current number of threads."""
    return _PIECE * min(max(torch.get_num_threads(), 1), _MAX_THREADS)


_square_thresholds: dict[tuple[float, torch.dtype], float | None] = {}


def _square_threshold(eps: float, dtype: torch.dtype) -> float | None:
    """``T`` such that, for every value ``x`` of ``dtype``, ``x * x <= T`` (squared in
    ``dtype``) exactly when ``|x| <= eps`` (``eps`` as ``dtype``), or None where no such ``T``
    exists. Rounded squares grow with ``|x|``, so ``T = eps * eps`` works unless the next
    value above ``eps`` squares to ``T`` too (an ``eps`` whose square is subnormal, 0); then
    the near-zero count takes ``|x|``. Comparing the squares the sum of squares already
    wrote saves a pass."""
    key = (eps, dtype)
    if key not in _square_thresholds:
        edge = torch.tensor(eps, dtype=dtype)
        above = torch.nextafter(edge, torch.tensor(math.inf, dtype=dtype))
        square, next_square = float(edge * edge), float(above * above)
        fine = eps >= 0 and square >= torch.finfo(dtype).tiny and next_square > square
        _square_thresholds[key] = square if fine else None
    return _square_thresholds[key]


def _pieces(
    x: torch.Tensor, eps: float, wanted: frozenset[str], axis: int | None
) -> tuple[list[float], float, torch.Tensor | None] | None:
    """``(row, sum of squares, channel maxima)`` of a CPU tensor reduced piece by piece (see
    the module docstring), the row as :func:`reduce_on_host` gives it; None where a piece would
    not fit the cache."""
    flat = x.reshape(-1)  # (a copy only where x is not contiguous: its values in logical order)
    count = flat.numel()
    channels = after = width = 1
    if axis is not None:
        channels, after = x.shape[axis], math.prod(x.shape[axis + 1 :])
        width = after if after >= _SHORT_RUN else channels * after
    if width > _MAX_RUN:
        return None
    step = max(1, _piece_size() // width) * width
    dtype = flat.dtype if flat.dtype in _SAME_WIDTH_INT else torch.float32
    moments = bool(wanted & {"mean", "std", "nonfinite"})
    extremes = bool(wanted & {"min", "max"})
    near = "near_zero" in wanted
    work = _buffer("work", dtype, step) if moments or near else None
    source = _buffer("source", dtype, step) if dtype != flat.dtype else None
    # per piece: sum, sum of squares, min, max, count near zero. (Every view the loop needs is
    # made up front, in one call per kind: a view costs ~1 us, the loop runs ~30 ops a MiB.)
    pieces: tuple[torch.Tensor, ...] = flat.split(step)  # type: ignore[no-untyped-call]
    last = pieces[-1].numel()
    slots = torch.full((5, len(pieces)), math.nan, dtype=dtype)
    sums, squares_of, lows, highs, nears = (row.unbind(0) for row in slots)
    runs: tuple[torch.Tensor, ...] = ()
    planes = maxima = current = None
    if axis is not None and after >= _SHORT_RUN:
        planes = torch.empty(count // after, dtype=dtype)  # the maximum of each (row, channel) run
        outs = planes.split(step // after)  # type: ignore[no-untyped-call]
        runs = flat.view(-1, after).split(step // after) if source is None else ()  # type: ignore[no-untyped-call]
    elif axis is not None:
        maxima, current = torch.empty(width, dtype=dtype), torch.empty(width, dtype=dtype)
        runs = flat.view(-1, width).split(step // width) if source is None else ()  # type: ignore[no-untyped-call]
    scratch = work[:step] if work is not None else None
    # the thresholds as 0-dim tensors of the pieces' dtype: a Python number is made a tensor
    # and cast on every call (~2 us a piece)
    square_edge = _square_threshold(eps, dtype) if near else None
    squared = None if square_edge is None else torch.tensor(square_edge, dtype=dtype)
    edge = torch.tensor(eps, dtype=dtype) if near and (squared is None or not moments) else None
    for index, piece in enumerate(pieces):
        if source is not None:  # fp16/bf16: reduced in float32, a piece at a time
            piece = source[: piece.numel()].copy_(piece)
        if work is not None and index == len(pieces) - 1:
            scratch = work[:last]
        if moments and scratch is not None:
            torch.sum(piece, dim=0, out=sums[index])
            # squares summed as torch sums (cascaded: ~1e-7 relative at any length and data),
            # not a BLAS dot (4e-6 over 256K bfloat16-valued floats)
            torch.sum(torch.mul(piece, piece, out=scratch), dim=0, out=squares_of[index])
        if extremes:
            torch.amin(piece, dim=0, out=lows[index])
            if axis is None:
                torch.amax(piece, dim=0, out=highs[index])
        if axis is not None:
            run = runs[index] if runs else piece.view(-1, after if planes is not None else width)
            if planes is not None:
                torch.amax(run, dim=1, out=outs[index])
            elif maxima is not None and current is not None:
                torch.amax(run, dim=0, out=maxima if index == 0 else current)
                if index:
                    torch.maximum(maxima, current, out=maxima)
        if near and scratch is not None:
            if squared is not None and moments:  # the squares are in scratch: x^2 <= T is |x| <= eps
                torch.le(scratch, squared, out=scratch)
            elif edge is not None:  # (NaN compares false: never near zero)
                torch.le(torch.abs(piece, out=scratch), edge, out=scratch)
            torch.sum(scratch, dim=0, out=nears[index])
    channel_max = None
    if planes is not None:
        channel_max = planes.view(-1, channels).amax(0)
    elif maxima is not None:
        channel_max = maxima.view(channels, after).amax(1)
    if channel_max is not None and channel_max.dtype != x.dtype:
        channel_max = channel_max.to(x.dtype)  # (exact: the maxima of values of x's dtype)
    row, squares = _row_of_pieces(x, wanted, slots, channel_max)
    return row, squares, channel_max


def _row_of_pieces(
    x: torch.Tensor, wanted: frozenset[str], slots: torch.Tensor, channel_max: torch.Tensor | None
) -> tuple[list[float], float]:
    """The row and sum of squares of ``x`` from its pieces' ``(5, pieces)`` sums, sums of
    squares, minima, maxima and counts near zero (NaN where not computed)."""
    as64 = slots.double()
    mean = std = near_zero = nonfinite = low = high = squares = math.nan
    if wanted & {"mean", "std", "nonfinite"}:
        mean, std, nonfinite, squares = _moments(x, float(as64[0].sum()), float(as64[1].sum()))
    if "near_zero" in wanted:
        near_zero = float(as64[4].sum()) / x.numel()
    if wanted & {"min", "max"}:
        low = float(slots[2].amin())  # (NaN where a piece held one, as a whole amin gives)
        high = float(channel_max.amax() if channel_max is not None else slots[3].amax())
    return _masked(wanted, (mean, std, near_zero, nonfinite, low, high)), squares


def host_row(
    x: torch.Tensor, eps: float, wanted: frozenset[str], axis: int | None
) -> tuple[list[float], torch.Tensor | None]:
    """The statistics of a CPU tensor as :func:`reduce_on_host` gives them, and with an
    ``axis`` its maximum per channel there (dead units), large tensors piece by piece."""
    if x.numel() > _piece_size():
        found = _pieces(x, eps, wanted, axis)
        if found is not None:
            return found[0], found[2]
    channel_max = None if axis is None else host_channel_max(x, axis)
    return reduce_on_host(x, eps, wanted, channel_max), channel_max


_GRAD_WANTED = frozenset({"mean", "std", "nonfinite", "min", "max"})  # (max |g| from the extremes)


def grad_on_host(grad: torch.Tensor) -> list[float]:
    """``[norm, mean, std, max |g|, non-finite count]`` of a CPU gradient (the norm, mean and
    std NaN where it holds non-finite values; the norm from its sum of squares)."""
    if grad.numel() > _piece_size():
        found = _pieces(grad, 0.0, _GRAD_WANTED, None)
        if found is not None:
            (mean, std, _, nonfinite, low, high), squares, _ = found
            if nonfinite:
                return [math.sqrt(squares), math.nan, math.nan, math.nan, nonfinite]
            return [math.sqrt(squares), mean, std, max(-low, high), 0.0]
    flat = _host_flat(grad)
    mean, std, nonfinite, squares = _host_moments(flat)
    if nonfinite:
        return [math.sqrt(squares), math.nan, math.nan, math.nan, nonfinite]
    # max |g| from the extremes: one read, where abs().max() writes a full temporary first
    # (ResNet-50's gradients: 8 ms against 13 ms on a 2-core Xeon)
    extremes = torch.aminmax(flat)
    return [math.sqrt(squares), mean, std, max(-float(extremes.min), float(extremes.max)), 0.0]
