"""The reduction kernels behind the statistics on a device: passes read once per batch, stacked
rows, fused compiled passes on request; and where a module's channels are. The CPU's exact host
reductions are in :mod:`.host`.
"""

from __future__ import annotations

import itertools
import math
import warnings
from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pytest_modelhooks._torch import dispatch_mode_active, is_compiling
from pytest_modelhooks.inputs import CONV_RANK
from pytest_modelhooks.stats.records import GRAD_STATISTICS, STATISTICS

if TYPE_CHECKING:
    pass

# Modules whose features are the last dimension, whatever the rank of their output.
_FEATURES_LAST = (
    nn.Linear,
    nn.Bilinear,
    nn.LayerNorm,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.RNNBase,
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


_RMS_NORM = getattr(nn, "RMSNorm", None)


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16 activations are reduced in float32; float64 stays float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def on_host(x: torch.Tensor) -> bool:
    """Whether ``x`` is reduced with host reads (CPU) or kept on its device (anything else, and
    the CPU while dynamo traces a compiled model: a host read would break its graph)."""
    return x.is_cpu and not is_compiling()  # (is_cpu first: it runs in every hook, and is cheap)


_thresholds: dict[tuple[float, torch.dtype], float] = {}


def _at_most(eps: float, dtype: torch.dtype) -> float:
    """The threshold that compares values of ``dtype`` with ``eps`` as float32 does: for fp16
    and bf16 the largest value of the dtype at most ``float32(eps)``, so their magnitudes are
    compared as they are, with no float32 copy, and count exactly what a copy would (``eps``
    rounded to bf16 would move the threshold: 0.05 to 0.05005). Other dtypes compare with
    ``eps`` itself."""
    if dtype in (torch.float32, torch.float64):
        return eps
    key = (eps, dtype)
    found = _thresholds.get(key)
    if found is None:
        target = float(torch.tensor(eps, dtype=torch.float32))
        value = torch.tensor(target, dtype=torch.float64).to(dtype)
        if float(value) > target:
            value = torch.nextafter(value, torch.tensor(-math.inf, dtype=dtype))
        found = _thresholds[key] = float(value)
    return found


def reduce_on_device(
    x: torch.Tensor,
    eps: float,
    wanted: frozenset[str] = frozenset(STATISTICS),
    channel_max: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Raw statistics on ``x``'s device, no host read: 0-d tensors for ``(mean, variance,
    near-zero count, finite count, min, max)``, None where not ``wanted``. :func:`_stack_raw`
    stacks a whole batch of them at once and :func:`finish_device` turns them into
    :data:`STATISTICS` on the host. ``channel_max``, when given, holds ``x``'s maximum per
    channel (dead units need it anyway): the overall max is read from it.

    On a GPU every kernel counts: each full pass over an activation costs ~25-130 us on an H200
    at batch 32 (a no_grad ResNet-50 forward is 6.8 ms), so this runs one pass per group of
    statistics asked for (var_mean; aminmax; one |x| with a comparison and a sum per count)
    and nothing else: no per-module stacking, no ``count_nonzero`` or ``isfinite`` (extra
    passes).
    """
    acc = _accumulator(x.dtype)
    parts: list[torch.Tensor | None] = [None] * len(STATISTICS)
    if wanted & {"mean", "std"}:
        # Welford: stable. (One value has no spread, and torch warns on each call: std 0 later.)
        correction = 1 if x.numel() > 1 else 0
        parts[1], parts[0] = torch.var_mean(x if x.dtype == acc else x.to(acc), correction=correction)
    if wanted & {"near_zero", "nonfinite"}:
        # One |x| feeds both counts. (histc counts in one pass, but on a GPU its single-bin
        # atomics cost 5x this; isfinite is four kernels.) NaN compares false both ways.
        magnitude = x.abs()  # (fp16/bf16 compared as they are: see _at_most)
        counter = torch.int32 if x.numel() < 2**31 else torch.int64  # int32 sums are faster
        if "near_zero" in wanted:
            parts[2] = (magnitude <= _at_most(eps, x.dtype)).sum(dtype=counter)
        if "nonfinite" in wanted:
            parts[3] = (magnitude <= torch.finfo(magnitude.dtype).max).sum(dtype=counter)
    if wanted & {"min", "max"} and channel_max is not None:
        parts[4], parts[5] = x.amin(), channel_max.amax()
    elif wanted & {"min", "max"}:
        parts[4], parts[5] = torch.aminmax(x)
    return tuple(parts)


def fused_raw(
    flat: torch.Tensor, eps: float, moments: bool, near_zero: bool, finite: bool, extremes: bool
) -> torch.Tensor:
    """``(6,)`` float64 raw row of a flat tensor, as :func:`reduce_on_device` returns it in
    parts (NaN where not asked for). Written to be compiled: ``torch.compile`` turns it into one
    pass over ``flat`` (Welford for the moments), with no temporaries."""
    x = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    nan = torch.full((), math.nan, dtype=torch.float64, device=x.device)
    parts = [nan] * len(STATISTICS)
    if moments:
        variance, mean = torch.var_mean(x)
        parts[0], parts[1] = mean.double(), variance.double()
    if near_zero or finite:
        magnitude = x.abs()
        if near_zero:
            parts[2] = (magnitude <= eps).sum().double()
        if finite:
            parts[3] = (magnitude <= torch.finfo(x.dtype).max).sum().double()
    if extremes:
        parts[4], parts[5] = x.amin().double(), x.amax().double()
    return torch.stack(parts)


def fused_rows(
    rows: torch.Tensor,
    eps: float,
    correction: int,
    moments: bool,
    near_zero: bool,
    finite: bool,
    extremes: bool,
) -> torch.Tensor:
    """:func:`fused_raw` for ``(k, n)`` rows at once: ``(k, 6)`` float64 raw rows, as
    :func:`reduce_rows` gives. Written to be compiled: one pass over the rows (Welford for the
    moments), however many tensors they hold."""
    x = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
    nan = torch.full((x.shape[0],), math.nan, dtype=torch.float64, device=x.device)
    parts = [nan] * len(STATISTICS)
    if moments:
        variance, mean = torch.var_mean(x, dim=1, correction=correction)
        parts[0], parts[1] = mean.double(), variance.double()
    if near_zero or finite:
        magnitude = x.abs()
        if near_zero:
            parts[2] = (magnitude <= eps).sum(dim=1, dtype=torch.float64)
        if finite:
            parts[3] = (magnitude <= torch.finfo(x.dtype).max).sum(dim=1, dtype=torch.float64)
    if extremes:
        parts[4], parts[5] = x.amin(dim=1).double(), x.amax(dim=1).double()
    return torch.stack(parts, dim=1)


def fused_grad_raw(flat: torch.Tensor, correction: int = 1) -> torch.Tensor:
    """``(5,)`` float64 raw gradient row ``(norm, mean, variance, max |g|, finite count)``, as
    :func:`grad_on_device` returns it; written to be compiled into one pass. ``correction``: 0
    for one value (no spread: std 0, as on the host)."""
    g = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    variance, mean = torch.var_mean(g, correction=correction)
    magnitude = g.abs()
    norm = g.double().square().sum().sqrt()  # accumulated in float64: exact for 100M values
    finite = (magnitude <= torch.finfo(g.dtype).max).sum()
    return torch.stack([norm, mean.double(), variance.double(), magnitude.amax().double(), finite.double()])


def fused_grad_rows(rows: torch.Tensor, correction: int) -> torch.Tensor:
    """:func:`fused_grad_raw` for ``(k, n)`` rows of ``k`` gradients of one shape: ``(k, 5)``,
    as :func:`grad_rows` gives; written to be compiled into one pass for all ``k``."""
    g = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
    variance, mean = torch.var_mean(g, dim=1, correction=correction)
    magnitude = g.abs()
    norm = g.double().square().sum(dim=1).sqrt()  # accumulated in float64, as fused_grad_raw
    finite = (magnitude <= torch.finfo(g.dtype).max).sum(dim=1, dtype=torch.float64)
    return torch.stack(
        [norm, mean.double(), variance.double(), magnitude.amax(dim=1).double(), finite], dim=1
    )


_compiled: dict[Any, Any] = {}


def compiled_call(owner: str, function: Any, *args: Any) -> torch.Tensor | None:
    """``function(*args)`` compiled once per process (dynamic shapes: one graph for every size,
    one per dtype and set of flags, the same with or without grad), or None after a warning
    where torch.compile cannot build it here (no C++ compiler, no Triton...). Under a dispatch
    mode (the first batch of a model without ReLU modules, watched for ``F.relu``; a user's
    ``FlopCounterMode``) ``function`` runs as it is: dynamo would compile nothing there, and
    would not try again in this process."""
    if dispatch_mode_active():
        with torch.no_grad():
            plain: torch.Tensor = function(*args)
        return plain
    compiled = _compiled.get(function)
    if compiled is None:
        compiled = _compiled[function] = torch.compile(function, dynamic=True, fullgraph=True)
    try:
        with torch.no_grad():  # dynamo would compile a graph per grad mode otherwise
            result: torch.Tensor = compiled(*args)
    except Exception as error:
        first_line = str(error).splitlines()[0] if str(error) else ""
        warnings.warn(
            f"{owner}(fused=True): torch.compile could not build the fused kernel "
            f"({type(error).__name__}: {first_line}); using separate passes",
            stacklevel=3,
        )
        return None
    return result


def _stack_raw(batch: list[Any]) -> torch.Tensor:
    """``(series, 6)`` float64 from a batch of :func:`reduce_on_device` results (or fused
    ``(6,)`` rows): one stack per statistic, on the device; slots not computed are NaN."""
    if all(isinstance(parts, torch.Tensor) for parts in batch):
        return torch.stack(batch)  # fused rows: one stack for the batch
    batch = [tuple(parts.unbind()) if isinstance(parts, torch.Tensor) else parts for parts in batch]
    columns = []
    device = next(part for part in batch[0] if part is not None).device
    for slot in range(len(STATISTICS)):
        values = [parts[slot] for parts in batch]
        if all(value is None for value in values):
            columns.append(torch.full((len(batch),), math.nan, dtype=torch.float64, device=device))
            continue
        if any(value is None for value in values):  # only where a fused record fell back mid-batch
            nan = torch.full((), math.nan, dtype=torch.float64, device=device)
            values = [nan if value is None else value.to(torch.float64) for value in values]
        columns.append(torch.stack(values).to(torch.float64))
    return torch.stack(columns, dim=1)


def _packed(rows: list[list[float]], width: int) -> torch.Tensor:
    """Host rows of Python floats as one ``(len(rows), width)`` float64 tensor: 8 bytes a value
    where lists of floats keep ~40 (a long run records 100,000s of batches). Built through an
    array: ~25% faster than ``torch.tensor`` on nested lists."""
    packed = array("d", itertools.chain.from_iterable(rows))
    return torch.frombuffer(packed, dtype=torch.float64).view(-1, width)


def device_blocks(pending: list[tuple[int, Any]]) -> list[tuple[Any, ...]]:
    """A batch's results grouped for storage: host rows as they are, device rows stacked once
    per device (a model may span devices, or return a CPU tensor from a GPU model)."""
    host_ids: list[int] = []
    host_rows: list[list[float]] = []
    devices: dict[torch.device, tuple[list[int], list[Any], list[int]]] = {}
    for series, value in pending:
        if isinstance(value, list):
            host_ids.append(series)
            host_rows.append(value)
        else:
            parts, count = value
            if isinstance(parts, torch.Tensor):  # a fused row
                device = parts.device
            else:
                device = next(part for part in parts if part is not None).device
            ids, raws, counts = devices.setdefault(device, ([], [], []))
            ids.append(series)
            raws.append(parts)
            counts.append(count)
    blocks: list[tuple[Any, ...]] = [(host_ids, _packed(host_rows, len(STATISTICS)))] if host_ids else []
    blocks += [(ids, _stack_raw(raws), counts) for ids, raws, counts in devices.values()]
    return blocks


def device_block_per_device(blocks: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The blocks of a batch (see :func:`device_blocks`, and the held outputs' reductions) with
    the device rows of each device joined into one block: one tensor per device and batch."""
    joined: list[tuple[Any, ...]] = []
    by_device: dict[torch.device, list[tuple[Any, ...]]] = {}
    for block in blocks:
        if len(block) == 2:
            joined.append(block)
        else:
            by_device.setdefault(block[1].device, []).append(block)
    for same in by_device.values():
        if len(same) == 1:
            joined.append(same[0])
            continue
        ids = [series for block in same for series in block[0]]
        counts = [count for block in same for count in block[2]]
        joined.append((ids, torch.cat([block[1] for block in same]), counts))
    return joined


def finish_device(raw: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``(series, 6)`` raw device statistics (float64, on the host; NaN where not computed, see
    :func:`_stack_raw`) to :data:`STATISTICS`."""
    finished = raw.clone()
    finished[:, 1] = raw[:, 1].clamp(min=0).sqrt()
    # one value has no spread: std 0, as on the host (the variance of one value is NaN)
    finished[:, 1] = torch.where((counts <= 1) & ~raw[:, 0].isnan(), 0.0, finished[:, 1])
    finished[:, 2] = raw[:, 2] / counts
    finished[:, 3] = counts - raw[:, 3]
    return finished


def nested_values(x: torch.Tensor) -> torch.Tensor:
    """A nested tensor's values as one dense tensor, its components joined along their first
    dimension (``(B, ragged, F)`` gives ``(total, F)``: statistics see every value once and no
    padding; features stay the last dimension, for dead units). Components that also differ
    further in are flattened."""
    components = x.unbind()
    if not components:
        return torch.empty(0, dtype=x.dtype, device=x.device)
    trailing = {tuple(component.shape[1:]) for component in components}
    if len(trailing) == 1 and components[0].dim() > 0:
        return torch.cat(components)
    return torch.cat([component.reshape(-1) for component in components])


_spatial_by_type: dict[type[nn.Module], int | None] = {}  # subclasses too, looked up once


def _conv_spatial(module: nn.Module) -> int | None:
    """The spatial rank of a convolution (or 2-d/3-d BatchNorm, which never sees an unbatched
    input), from the table the dummy batches use; None for other modules."""
    kind = type(module)
    if kind not in _spatial_by_type:
        _spatial_by_type[kind] = next(
            (rank for conv, rank in CONV_RANK.items() if isinstance(module, conv)), None
        )
    return _spatial_by_type[kind]


def channel_dim(module: nn.Module, rank: int, conv1d_model: bool) -> int | None:
    spatial = _conv_spatial(module)
    if spatial is not None and rank == spatial + 1:
        return 0  # an unbatched convolution, (C, *spatial): one sample, as under vmap
    if rank < 2:
        return None
    if isinstance(module, _FEATURES_LAST) or (_RMS_NORM is not None and isinstance(module, _RMS_NORM)):
        return rank - 1
    if rank == 3 and not isinstance(module, (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d)):
        # (B, C, L) for 1-d conv nets, (B, L, F) for sequence models
        return 1 if conv1d_model else 2
    return 1


def grad_on_device(grad: torch.Tensor) -> torch.Tensor:
    """Raw ``(norm, mean, variance, max |g|, finite count)`` on the device, as :func:`grad_rows`
    gives for one gradient (the norm NaN: :func:`finish_grads` derives it on the host)."""
    return grad_rows(grad.unsqueeze(0))[0]


def sparse_grad_raw(grad: torch.Tensor) -> torch.Tensor:
    """Raw ``(norm, mean, variance, max |g|, finite count)`` of a sparse gradient (an
    ``nn.Embedding(sparse=True)``'s), as :func:`grad_on_device` gives for its dense equal: the
    elements it does not store are zeros and count in the mean and the variance. Computed from
    the stored values alone, on their device: such tables are the ones too big to densify."""
    if grad.layout == torch.sparse_coo:
        grad = grad.coalesce()  # a row looked up twice is stored twice until its parts add up
    values = grad.values()
    count = grad.numel()
    if values.is_complex():  # over the real and imaginary parts, as for a dense gradient
        values, count = torch.view_as_real(values.resolve_conj()), 2 * count
    values = values.double()
    total = values.sum()
    squares = values.square().sum()
    mean = total / count
    variance = (squares - total * mean).clamp(min=0) / max(count - 1, 1)
    max_abs = torch.linalg.vector_norm(values, float("inf")) if values.numel() else values.new_zeros(())
    finite = count - (~torch.isfinite(values)).sum()
    return torch.stack([squares.sqrt(), mean, variance, max_abs, finite.double()])


def finish_grads(raw: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """``(params, 5)`` raw rows (see :func:`grad_rows`) to :data:`GRAD_STATISTICS`, on the
    host; ``sizes`` are the parameters' element counts.

    A norm left NaN is derived here from the moments, ``sum(g * g) = (n - 1) * var + n *
    mean**2`` (two non-negative terms: no cancellation, as exact as the moments), so the device
    reads each gradient once less; where a gradient holds non-finite values its norm is what
    ``vector_norm`` gives, inf, or NaN where there is a NaN - as max |g| is.
    """
    rows = raw.to("cpu", torch.float64)
    counts = torch.tensor(sizes, dtype=torch.float64)
    derive = rows[:, 0].isnan()
    if bool(derive.any()):
        squares = (counts - 1).clamp(min=0) * rows[:, 2] + counts * rows[:, 1].square()
        derived = torch.where(rows[:, 4] == counts, squares.clamp(min=0).sqrt(), rows[:, 3])
        rows[:, 0] = torch.where(derive, derived, rows[:, 0])
    rows[:, 2] = rows[:, 2].clamp(min=0).sqrt()
    # float64: a float32 count is off by one past 2**24 elements
    rows[:, 4] = counts - rows[:, 4]
    return rows


def pack_grad_rows(pending: dict[int, Any], sizes: Sequence[int]) -> tuple[torch.Tensor, bool]:
    """A step's rows as one tensor, and whether they are raw (device or fused rows, finished
    when read) or finished (host rows). A long run records 100,000s of steps: one tensor per
    step, not a list of Python floats per parameter. Host rows: one float64 tensor; device
    rows: stacked on their device (no sync); a model across devices or a fused pass that fell
    back mid-step: each row finished here (reads the device once; rare)."""
    values = list(pending.values())
    if all(isinstance(value, list) for value in values):
        return _packed(values, len(GRAD_STATISTICS)), False
    if all(isinstance(value, torch.Tensor) for value in values) and len({v.device for v in values}) == 1:
        return torch.stack(values), True
    rows = [
        torch.tensor(value, dtype=torch.float64)
        if isinstance(value, list)
        else finish_grads(value.reshape(1, -1), [sizes[position]])[0]
        for position, value in pending.items()
    ]
    return torch.stack(rows), False


def reduce_rows(
    stacked: torch.Tensor,
    eps: float,
    wanted: frozenset[str] = frozenset(STATISTICS),
    axis: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`reduce_on_device` for ``k`` tensors of one shape at once, stacked along a new
    first dimension: a ``(k, 6)`` float64 tensor of raw rows (NaN where not ``wanted``) for
    :func:`finish_device`, and with ``axis`` (the channel dimension of each tensor) their
    ``(k, channels)`` maxima per channel. The same passes as :func:`reduce_on_device`, each
    run once for the ``k`` tensors instead of once per tensor: on a GPU the launches of a
    batch's statistics grow with its shapes, not with its modules."""
    if stacked.dim() == 1:  # 0-d tensors: a row of one value each (dim=() would mean all dims)
        stacked = stacked.unsqueeze(1)
    rows = stacked.shape[0]
    dims = tuple(range(1, stacked.dim()))
    acc = _accumulator(stacked.dtype)
    nan = None
    parts: list[torch.Tensor | None] = [None] * len(STATISTICS)
    if wanted & {"mean", "std"}:
        # (one value per row has no spread, and torch warns on each call: finish_device gives 0)
        correction = 1 if stacked.numel() > rows else 0
        cast = stacked if stacked.dtype == acc else stacked.to(acc)
        variance, mean = torch.var_mean(cast, dim=dims, correction=correction)
        parts[0], parts[1] = mean, variance
    if wanted & {"near_zero", "nonfinite"}:
        magnitude = stacked.abs()  # (fp16/bf16 compared as they are: see _at_most)
        # counted in float64: exact to 2**53 values, one pass each as in reduce_on_device
        if "near_zero" in wanted:
            parts[2] = (magnitude <= _at_most(eps, stacked.dtype)).sum(dim=dims, dtype=torch.float64)
        if "nonfinite" in wanted:
            parts[3] = (magnitude <= torch.finfo(magnitude.dtype).max).sum(dim=dims, dtype=torch.float64)
    channel_max = None
    extremes = bool(wanted & {"min", "max"})
    if axis is not None and extremes and stacked.is_contiguous():
        # one read for both the maxima per channel and the minimum: aminmax over the values
        # after the channels, of a (k, before, channels, after) view
        shape = stacked.shape[1:]
        before, after = math.prod(shape[:axis]), math.prod(shape[axis + 1 :])
        if after == 1:
            low, channel_max = torch.aminmax(stacked.view(rows, before, shape[axis]), dim=1)
            parts[4] = low.amin(dim=1)
        else:
            low, high = torch.aminmax(stacked.view(rows, before, shape[axis], after), dim=3)
            parts[4], channel_max = low.amin(dim=(1, 2)), high.amax(dim=1)
        parts[5] = channel_max.amax(dim=1)
    else:
        if axis is not None:
            channel_max = stacked.amax(dim=tuple(d for d in dims if d != axis + 1))
        if extremes and channel_max is not None:
            parts[4], parts[5] = stacked.amin(dim=dims), channel_max.amax(dim=1)
        elif extremes and stacked.is_contiguous():
            both = torch.aminmax(stacked.view(rows, -1), dim=1)  # one pass for both
            parts[4], parts[5] = both.min, both.max
        elif extremes:  # (one tensor in another layout: no copy to flatten it)
            parts[4], parts[5] = stacked.amin(dim=dims), stacked.amax(dim=dims)
    columns = []
    for part in parts:
        if part is None:
            if nan is None:
                nan = torch.full((rows,), math.nan, dtype=torch.float64, device=stacked.device)
            part = nan
        columns.append(part.to(torch.float64))
    return torch.stack(columns, dim=1), channel_max


def grad_rows(stacked: torch.Tensor) -> torch.Tensor:
    """Raw statistics of ``k`` gradients of one shape, stacked along a new first dimension:
    ``(k, 5)`` float64 rows ``(norm, mean, variance, max |g|, finite count)`` for
    :func:`finish_grads`, on the device. Two reads of the stack (``var_mean``, ``abs``) and two
    of the magnitudes (max |g|, the finite comparison; ``isfinite`` would be four kernels and
    six passes); the norm is left NaN, for :func:`finish_grads` to derive from the moments."""
    if stacked.dim() == 1:  # 0-d parameters: a row of one value each (dim=() would mean all dims)
        stacked = stacked.unsqueeze(1)
    dims = tuple(range(1, stacked.dim()))
    acc = _accumulator(stacked.dtype)
    g = stacked if stacked.dtype == acc else stacked.to(acc)
    # one value has no spread (std 0, as on the host; torch would warn and give NaN)
    variance, mean = torch.var_mean(g, dim=dims, correction=1 if stacked.numel() > stacked.shape[0] else 0)
    magnitude = stacked.abs()  # (in the gradient's own dtype: exact, and half the bytes for fp16)
    max_abs = magnitude.amax(dim=dims)
    # NaN compares false: not counted finite
    finite = (magnitude <= torch.finfo(magnitude.dtype).max).sum(dim=dims, dtype=torch.float64)
    norm = torch.full_like(finite, math.nan)
    middle = [part.to(torch.float64) for part in (mean, variance, max_abs)]
    return torch.stack([norm, *middle, finite], dim=1)
