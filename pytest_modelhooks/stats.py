"""Activation and gradient statistics, computed where the tensors live.

:class:`ActivationStats` records, for every hooked module and every recorded forward ("batch"),
the mean, std, fraction of values near zero, count of non-finite values, min and max of each
floating-point tensor the module returns, plus per-layer dead units and optional histograms.
:class:`GradientStats` does the same for parameter gradients after each backward.

Speed rules (see the README's Performance section for figures):

* On CUDA and other accelerators nothing is read back per module: each module's numbers are
  reduced on the device, stacked once per batch, and cross to the host once, when read.
* On the CPU the device *is* the host, so reading a scalar costs ~1 us and no synchronisation;
  it is used to run the exact two-pass std only where the one-pass formula would lose
  precision (a large mean over a small spread), and to count non-finite values only when the
  sums say there are any.
* Activations are never kept: memory is O(series x batches) numbers.
"""

from __future__ import annotations

import importlib
import itertools
import math
import threading
import warnings
import weakref
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter
from torch.utils.hooks import RemovableHandle

from pytest_modelhooks._tree import tensor_leaves
from pytest_modelhooks.hooks import (
    HookCallback,
    ModuleSpec,
    _is_compiling,
    loaded_class,
    select_modules,
    unvmapped,
)
from pytest_modelhooks.shapes import _CONV_RANK

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from pytest_modelhooks.checks import Finding

__all__ = [
    "STATISTICS",
    "ActivationStats",
    "GradientStats",
    "LayerStats",
    "ParamGradStats",
    "SteppedOptimizer",
]

#: The per-batch statistics of an activation series, in the order of the rows of ``_values``.
STATISTICS = ("mean", "std", "near_zero", "nonfinite", "min", "max")

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


#: The id of the backward pass running on this thread, -1 outside backward.
_graph_task_id: Callable[[], int] = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def _on_host(x: torch.Tensor) -> bool:
    """Whether ``x`` is reduced with host reads (CPU) or kept on its device (anything else, and
    the CPU while dynamo traces a compiled model: a host read would break its graph)."""
    return x.device.type == "cpu" and not _is_compiling()


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
    buffers: dict[torch.dtype, torch.Tensor] = _scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get(flat.dtype)
    if buffer is None:
        # a normal tensor even when first made under inference_mode: it is reused outside it
        with torch.inference_mode(False):
            buffer = buffers[flat.dtype] = torch.empty(_CHUNK, dtype=flat.dtype)
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


def _host_moments(flat: torch.Tensor) -> tuple[float, float, float, float]:
    """``(mean, std, non-finite count, sum of squares)`` of a flat float32/float64 CPU tensor;
    mean and std are NaN when there are non-finite values."""
    count = flat.numel()
    total = float(flat.sum())
    squares = _sum_of_squares(flat)
    if not (math.isfinite(total) and math.isfinite(squares)):
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
    if count > 1 and mean * mean > 20 * variance * (1.0 if flat.dtype == torch.float32 else 1e8):
        return mean, float(flat.std()), 0.0, squares
    return mean, math.sqrt(variance) if count > 1 else 0.0, 0.0, squares


def _reduce_on_host(
    x: torch.Tensor,
    eps: float,
    wanted: frozenset[str] = frozenset(STATISTICS),
    channel_max: torch.Tensor | None = None,
) -> list[float]:
    """The statistics of a CPU tensor as Python floats, NaN for those not ``wanted`` (see the
    module docstring). ``channel_max``, when given, holds ``x``'s maximum per channel (dead
    units need it anyway): the overall max is read from it instead of from ``x`` again."""
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
    return [
        value if name in wanted else math.nan
        for name, value in zip(STATISTICS, (mean, std, near_zero, nonfinite, low, high), strict=True)
    ]


def _reduce_on_device(
    x: torch.Tensor,
    eps: float,
    wanted: frozenset[str] = frozenset(STATISTICS),
    channel_max: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Raw statistics on ``x``'s device, no host read: 0-d tensors for ``(mean, variance,
    near-zero count, finite count, min, max)``, None where not ``wanted``. :func:`_stack_raw`
    stacks a whole batch of them at once and :func:`_finish_device` turns them into
    :data:`STATISTICS` on the host. ``channel_max`` as in :func:`_reduce_on_host`.

    On a GPU every kernel counts: each full pass over an activation costs ~25-130 us on an H200
    at batch 32 (a no_grad ResNet-50 forward is 6.8 ms), so this runs one pass per group of
    statistics asked for (var_mean; aminmax; one |x| with a comparison and a sum per count)
    and nothing else: no per-module stacking, no ``count_nonzero`` or ``isfinite`` (extra
    passes).
    """
    acc = _accumulator(x.dtype)
    parts: list[torch.Tensor | None] = [None] * len(STATISTICS)
    if wanted & {"mean", "std"}:
        parts[1], parts[0] = torch.var_mean(x if x.dtype == acc else x.to(acc))  # Welford: stable
    if wanted & {"near_zero", "nonfinite"}:
        # One |x| feeds both counts. (histc counts in one pass, but on a GPU its single-bin
        # atomics cost 5x this; isfinite is four kernels.) NaN compares false both ways.
        magnitude = x.abs() if x.dtype in (torch.float32, torch.float64) else x.abs().float()
        counter = torch.int32 if x.numel() < 2**31 else torch.int64  # int32 sums are faster
        if "near_zero" in wanted:
            parts[2] = (magnitude <= eps).sum(dtype=counter)
        if "nonfinite" in wanted:
            parts[3] = (magnitude <= torch.finfo(magnitude.dtype).max).sum(dtype=counter)
    if wanted & {"min", "max"} and channel_max is not None:
        parts[4], parts[5] = x.amin(), channel_max.amax()
    elif wanted & {"min", "max"}:
        parts[4], parts[5] = torch.aminmax(x)
    return tuple(parts)


def _fused_raw(
    flat: torch.Tensor, eps: float, moments: bool, near_zero: bool, finite: bool, extremes: bool
) -> torch.Tensor:
    """``(6,)`` float64 raw row of a flat tensor, as :func:`_reduce_on_device` returns it in
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


def _fused_grad_raw(flat: torch.Tensor) -> torch.Tensor:
    """``(5,)`` float64 raw gradient row ``(norm, mean, variance, max |g|, finite count)``, as
    :func:`_grad_on_device` returns it; written to be compiled into one pass."""
    g = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    variance, mean = torch.var_mean(g)
    magnitude = g.abs()
    norm = g.double().square().sum().sqrt()  # accumulated in float64: exact for 100M values
    finite = (magnitude <= torch.finfo(g.dtype).max).sum()
    return torch.stack([norm, mean.double(), variance.double(), magnitude.amax().double(), finite.double()])


_compiled: dict[Any, Any] = {}


def _compiled_call(owner: str, function: Any, *args: Any) -> torch.Tensor | None:
    """``function(*args)`` compiled once per process (dynamic shapes: one graph for every size,
    one per dtype and set of flags, the same with or without grad), or None after a warning
    where torch.compile cannot build it here (no C++ compiler, no Triton...)."""
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
    """``(series, 6)`` float64 from a batch of :func:`_reduce_on_device` results (or fused
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


def _blocks(pending: list[tuple[int, Any]]) -> list[tuple[Any, ...]]:
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


def _finish_device(raw: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``(series, 6)`` raw device statistics (float64, on the host; NaN where not computed, see
    :func:`_stack_raw`) to :data:`STATISTICS`."""
    finished = raw.clone()
    finished[:, 1] = raw[:, 1].clamp(min=0).sqrt()
    # one value has no spread: std 0, as on the host (the variance of one value is NaN)
    finished[:, 1] = torch.where((counts <= 1) & ~raw[:, 0].isnan(), 0.0, finished[:, 1])
    finished[:, 2] = raw[:, 2] / counts
    finished[:, 3] = counts - raw[:, 3]
    return finished


def _nested_values(x: torch.Tensor) -> torch.Tensor:
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
            (rank for conv, rank in _CONV_RANK.items() if isinstance(module, conv)), None
        )
    return _spatial_by_type[kind]


def _channel_dim(module: nn.Module, rank: int, conv1d_model: bool) -> int | None:
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


@dataclass(frozen=True)
class LayerStats:
    """The statistics of one series (one tensor a module returns) over the recorded batches.

    Each statistic is a float64 tensor with one value per recorded batch (NaN where the module
    did not run in that batch, see ``ran``, or where the statistic was not recorded). ``dead``
    is the fraction of channels (features) whose value was never above zero on any recorded
    sample, or None when there is no channel dimension. ``model_output`` marks a tensor that
    the model itself returned (logits, a decoder's last layer): its dead units are recorded
    but not judged by ``max_dead``, since an output is read as it is, not through a ReLU,
    unless it is rectified (never below zero: a backbone ending in a ReLU).

    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    >>> with ActivationStats(net) as stats:
    ...     for _ in range(3):
    ...         _ = net(torch.randn(16, 4))
    >>> layer = stats["0"]
    >>> layer.name, layer.type, layer.mean.shape, layer.ran.tolist()
    ('0', 'Linear', torch.Size([3]), [True, True, True])
    """

    name: str
    module: str
    type: str
    position: int  # order of first appearance: execution order
    batches: torch.Tensor
    ran: torch.Tensor  # per recorded batch: whether the module produced this series
    mean: torch.Tensor
    std: torch.Tensor
    near_zero: torch.Tensor
    nonfinite: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor
    dead: float | None
    channels: int | None
    hist: torch.Tensor | None = field(repr=False)
    model_output: bool = False

    def __getitem__(self, statistic: str) -> torch.Tensor:
        if statistic not in STATISTICS:
            raise KeyError(f"unknown statistic {statistic!r}; choose from {', '.join(STATISTICS)}")
        value: torch.Tensor = getattr(self, statistic)
        return value

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (NaN becomes None)."""
        data: dict[str, Any] = {
            "name": self.name,
            "module": self.module,
            "type": self.type,
            "batches": self.batches.tolist(),
            "dead": self.dead,
            "channels": self.channels,
            "model_output": self.model_output,
        }
        for statistic in STATISTICS:
            data[statistic] = [None if math.isnan(value) else value for value in self[statistic].tolist()]
        return data


class ActivationStats(HookCallback):
    """Record activation statistics of ``model``'s modules, batch by batch.

    A *batch* is one forward of ``model``. Use it as a context manager around forward passes or
    training steps, or call ``on_train_begin()`` / ``on_train_end()`` from any loop.

    * ``modules``: default, the modules that own parameters (as fastai); also ``"all"``,
      ``"leaves"``, names, globs, types (see :func:`select_modules`).
    * ``every``: record one batch in ``every``; ``train_only``: record only forwards in
      training mode.
    * ``eps``: a value is near zero when ``|x| <= eps``.
    * ``with_hist``: also keep a histogram per batch (``hist_bins`` over ``hist_range``).
    * ``fused``: compute every statistic in one compiled pass per activation
      (``torch.compile``; the first batch of each process pays a compile of several seconds,
      and it needs a C++ compiler on the CPU or Triton on a GPU; where it cannot compile, a
      warning, then separate passes). Worth it for long runs; see the README's Performance.
    * ``statistics``: which of :data:`STATISTICS` to compute (default all); each is a pass over
      every activation, so ``statistics=("mean", "std")`` with ``track_dead=False`` is the
      cheapest record. NaN and infinities are still found without ``"nonfinite"``: they show
      in the mean and std.

    ``stats.stats`` is fastai's layout: a float tensor ``(2, num_modules, num_batches)`` of
    (mean, std) of each hooked module's (first) output. ``stats["encoder.conv1"]`` gives a
    :class:`LayerStats` with every statistic; tuple/dict outputs give one series per tensor
    (``stats["lstm[0]"]``, ``stats["out.logits"]``).

    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> with ActivationStats(net) as stats:
    ...     for _ in range(3):
    ...         _ = net(torch.randn(4, 8))
    >>> stats.stats.shape, stats.series_names
    (torch.Size([2, 2, 3]), ['0', '2'])
    """

    def __init__(
        self,
        model: nn.Module,
        modules: ModuleSpec = None,
        *,
        every: int = 1,
        train_only: bool = False,
        eps: float = 0.05,
        with_hist: bool = False,
        hist_bins: int = 80,
        hist_range: tuple[float, float] = (-10.0, 10.0),
        track_dead: bool = True,
        statistics: Sequence[str] = STATISTICS,
        fused: bool = False,
    ) -> None:
        unknown = sorted(set(statistics) - set(STATISTICS))
        if unknown or not statistics or isinstance(statistics, str):
            raise ValueError(
                f"statistics must be a non-empty collection of {', '.join(STATISTICS)}, "
                f"got statistics={statistics!r}"
            )
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got every={every!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got eps={eps!r}")
        if with_hist and (hist_bins < 1 or not hist_range[0] < hist_range[1]):
            raise ValueError(
                f"need hist_bins >= 1 and hist_range=(low, high) with low < high, "
                f"got hist_bins={hist_bins!r}, hist_range={hist_range!r}"
            )
        super().__init__(model, modules, detach=False)
        self.every = every
        self.train_only = train_only
        self.eps = eps
        self.with_hist = with_hist
        self.hist_bins = hist_bins
        self.hist_range = hist_range
        self.track_dead = track_dead
        self.statistics = frozenset(statistics)
        self.fused = fused
        self._fused_flags = (
            bool(self.statistics & {"mean", "std"}),
            "near_zero" in self.statistics,
            "nonfinite" in self.statistics,
            bool(self.statistics & {"min", "max"}),
        )
        self._conv1d = any(isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)) for module in model.modules())
        self._names_by_id = {id(module): name for name, module in self.named_modules}
        self._series: dict[tuple[int, str, int], int] = {}
        self._calls_this_batch: dict[int, int] = {}
        self._series_names: list[str] = []
        self._series_modules: list[str] = []
        self._series_types: list[str] = []
        self._series_first: dict[int, int] = {}  # module id -> its first series (fastai layout)
        self._forwards = 0
        self._recording = False
        self._pending: list[tuple[int, Any]] = []
        self._pending_hist: list[tuple[int, torch.Tensor]] = []
        # per recorded batch: (batch index, blocks); a block is (series ids, host rows) or
        # (series ids, device tensor of raw rows, element counts), one per device
        self._batches: list[tuple[int, list[tuple[Any, ...]]]] = []
        self._hists: list[tuple[int, list[int], torch.Tensor]] = []
        self._channel_max: dict[int, torch.Tensor] = {}
        # this batch's tensors with dead units tracked, to tell which the model returned
        self._tracked: list[tuple[int, weakref.ref[torch.Tensor]]] = []
        self._model_outputs: set[int] = set()
        self._batch_handles: list[RemovableHandle] = []
        self._id_tuples: dict[tuple[int, ...], tuple[int, ...]] = {}
        self._saw_meta = False
        self._any_call = False  # whether a hooked module ran in any recorded forward
        self._cache: dict[str, Any] | None = None

    # ------------------------------------------------------------------ recording

    def on_train_begin(self, **kwargs: Any) -> None:
        """Register the hooks; the batch markers go on after the module hooks, so that the
        model's own output (when hooked) lands in the batch it belongs to."""
        super().on_train_begin(**kwargs)
        if not self._batch_handles:
            self._batch_handles = [
                self.model.register_forward_pre_hook(self._begin_batch),
                self.model.register_forward_hook(self._end_batch),
            ]

    def remove(self) -> None:
        super().remove()
        for handle in self._batch_handles:
            handle.remove()
        self._batch_handles = []

    def _begin_batch(self, module: nn.Module, args: Any) -> None:
        if not _is_compiling() and _graph_task_id() != -1:
            # a forward inside backward: activation checkpointing recomputes the model
            # (``checkpoint(model, x)``); that batch was recorded on its way forward. (Not
            # asked while dynamo traces: the query would break its graph; compiled
            # checkpointing recomputes inside the compiled graph, without hooks.)
            self._recording = False
            return
        wanted = not self.train_only or self.model.training
        self._recording = wanted and self._forwards % self.every == 0
        self._forwards += 1
        self._pending = []
        self._pending_hist = []
        self._calls_this_batch = {}
        self._tracked = []

    def _end_batch(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._recording:
            return
        self._recording = False
        self._any_call = self._any_call or bool(self._calls_this_batch)
        batch = self._forwards - 1
        if self._tracked:
            # by identity, through weak references: a live tensor's id is its own
            returned = {id(tensor) for _, tensor in tensor_leaves(output)}
            for series, ref in self._tracked:
                tensor = ref()
                if tensor is not None and id(tensor) in returned:
                    self._model_outputs.add(series)
            self._tracked = []
        if self._pending:
            blocks = _blocks(self._pending)
            # the same series (and sizes) every batch: one tuple of each kept, not a list per batch
            self._batches.append((batch, [tuple(self._interned(part) for part in block) for block in blocks]))
        # histograms: one stack per device (a model may span devices)
        by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
        for series, hist in self._pending_hist:
            by_device.setdefault(hist.device, []).append((series, hist))
        for entries in by_device.values():
            self._hists.append(
                (batch, [series for series, _ in entries], torch.stack([h for _, h in entries]))
            )
        self._pending = []
        self._pending_hist = []
        self._cache = None

    def _interned(self, part: Any) -> Any:
        """A list of ints as the one tuple kept for its values; anything else as it is."""
        if not isinstance(part, list):
            return part
        key = tuple(part)
        return self._id_tuples.setdefault(key, key)

    def _series_id(self, module: nn.Module, path: str, call: int) -> int:
        key = (id(module), path, call)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = len(self._series_names)
            module_name = self._names_by_id.get(id(module), "?")
            name = module_name + path if module_name or not path else path.lstrip(".")
            if not module_name and path and any(name == other for other, _ in self.model.named_modules()):
                name = "(model)" + path  # the model's output "head" is not its layer "head"
            # a module called twice in one forward gets a series per call, as summaries get rows
            self._series_names.append(name if call == 1 else f"{name} [call {call}]")
            self._series_modules.append(module_name)
            self._series_types.append(type(module).__name__)
            self._series_first.setdefault(id(module), series)
        return series

    def hook(self, module: nn.Module, input: Any, output: Any) -> None:
        """Reduce each floating-point (or complex) tensor ``module`` returned to its statistics."""
        # No no_grad() here: the tensors are detached, so nothing records a graph, and the
        # context manager would cost more per call than the rest of this method.
        if not self._recording:
            return
        call = self._calls_this_batch[id(module)] = self._calls_this_batch.get(id(module), 0) + 1
        leaves = [("", output)] if isinstance(output, torch.Tensor) else list(tensor_leaves(output))
        for path, tensor in leaves:
            if tensor.is_quantized:  # a quantized model's activations: their values, dequantized
                tensor = tensor.dequantize()
            complex_valued = tensor.is_complex()
            if not (tensor.is_floating_point() or complex_valued) or tensor.numel() == 0:
                continue
            x, leading = unvmapped(tensor)  # under vmap: the whole batch, its dims in front
            if x.is_meta:  # shapes without values (a model built on meta): nothing to measure
                self._saw_meta = True
                continue
            x = x.detach()
            if x.is_nested:
                x = _nested_values(x)
            if complex_valued:
                # a spectral layer's output: its real and imaginary parts are the values (a
                # complex number is never "above zero", so no dead units)
                x = torch.view_as_real(x.resolve_conj())
            series = self._series_id(module, path, call)
            tracks_dead = self.track_dead and not complex_valued
            channel_max = self._channel_max_of(module, x, leading) if tracks_dead else None
            fused = self._reduce_fused(x) if self.fused else None
            if fused is not None:
                self._pending.append((series, (fused, x.numel())))
            elif _on_host(x):
                self._pending.append((series, _reduce_on_host(x, self.eps, self.statistics, channel_max)))
            else:
                raw = _reduce_on_device(x, self.eps, self.statistics, channel_max)
                self._pending.append((series, (raw, x.numel())))
            if channel_max is not None:
                self._track_dead(series, channel_max)
                self._tracked.append((series, weakref.ref(tensor)))
            if self.with_hist:
                low, high = self.hist_range
                self._pending_hist.append((series, torch.histc(x.float(), self.hist_bins, low, high)))

    def _reduce_fused(self, x: torch.Tensor) -> torch.Tensor | None:
        """The fused ``(6,)`` raw row of ``x``, or None (after one warning) where torch.compile
        cannot build the kernel here: the separate passes take over."""
        row = _compiled_call("ActivationStats", _fused_raw, x.reshape(-1), self.eps, *self._fused_flags)
        if row is None:
            self.fused = False
        return row

    def _channel_max_of(self, module: nn.Module, x: torch.Tensor, leading: int = 0) -> torch.Tensor | None:
        """Per channel, the max over everything else (``leading`` batch dims of vmap come
        first, before the dims the module sees)."""
        dim = _channel_dim(module, x.dim() - leading, self._conv1d)
        if dim is None:
            return None
        dim += leading
        return x.amax(dim=[axis for axis in range(x.dim()) if axis != dim])

    def _track_dead(self, series: int, current: torch.Tensor) -> None:
        # the running max per channel: a channel is dead while its max stays <= 0
        seen = self._channel_max.get(series)
        if seen is None or seen.shape != current.shape:
            self._channel_max[series] = current
        else:
            # not in place: a running max made under inference_mode cannot be updated outside it
            self._channel_max[series] = torch.maximum(seen, current)

    # ------------------------------------------------------------------ reading

    def _gather(self) -> dict[str, Any]:
        """Everything recorded, on the host: one transfer for all batches."""
        if self._cache is not None:
            return self._cache
        num_series, num_batches = len(self._series_names), len(self._batches)
        values = torch.full((len(STATISTICS), num_series, num_batches), math.nan, dtype=torch.float64)
        batch_ids = torch.tensor([batch for batch, _ in self._batches], dtype=torch.long)
        ran = torch.zeros((num_series, num_batches), dtype=torch.bool)
        for column, (_, blocks) in enumerate(self._batches):
            for block in blocks:
                if len(block) == 3:  # device rows, finished on the host
                    ids, raw, counts = block
                    rows = _finish_device(
                        raw.to("cpu", torch.float64), torch.tensor(counts, dtype=torch.float64)
                    )
                else:
                    ids, rows = block
                values[:, ids, column] = rows.T
                ran[ids, column] = True
        dead: dict[int, tuple[float, int]] = {}
        for series, channel_max in self._channel_max.items():
            never_positive = channel_max.cpu() <= 0  # NaN compares False: not counted dead
            dead[series] = (float(never_positive.double().mean()), never_positive.numel())
        hists: dict[int, torch.Tensor] = {}
        if self._hists:
            column_of = {batch: column for column, batch in enumerate(batch_ids.tolist())}
            for batch, ids, stacked in self._hists:
                host = stacked.cpu()
                for row, series in enumerate(ids):
                    hist = hists.setdefault(series, torch.zeros(num_batches, self.hist_bins))
                    hist[column_of[batch]] = host[row]
        self._cache = {"values": values, "ran": ran, "batches": batch_ids, "dead": dead, "hists": hists}
        return self._cache

    @property
    def series_names(self) -> list[str]:
        """Every recorded series, in order of first appearance (execution order)."""
        return list(self._series_names)

    @property
    def num_batches(self) -> int:
        """How many batches were recorded."""
        return len(self._batches)

    @property
    def stats(self) -> torch.Tensor:
        """fastai's layout: ``(2, num_modules, num_batches)`` of (mean, std), one row per hooked
        module in ``modules`` order (its first output tensor; NaN where it never ran)."""
        gathered = self._gather()
        rows = []
        for module in self.modules:
            series = self._series_first.get(id(module))
            if series is None:
                rows.append(torch.full((2, self.num_batches), math.nan, dtype=torch.float64))
            else:
                rows.append(gathered["values"][:2, series])
        if not rows:
            return torch.empty(2, 0, self.num_batches)
        return torch.stack(rows, dim=1).float()

    def __len__(self) -> int:
        return len(self._series_names)

    def __iter__(self) -> Iterator[LayerStats]:
        return (self[index] for index in range(len(self)))

    def __getitem__(self, key: int | str) -> LayerStats:
        """The :class:`LayerStats` of a series, by position or name."""
        if isinstance(key, str):
            if key not in self._series_names:
                shown = ", ".join(self._series_names[:12]) or "(none recorded yet)"
                raise KeyError(f"no statistics for {key!r}; recorded series are: {shown}")
            index = self._series_names.index(key)
        else:
            index = range(len(self._series_names))[key]
        gathered = self._gather()
        values = gathered["values"][:, index]
        dead, channels = gathered["dead"].get(index, (None, None))
        return LayerStats(
            name=self._series_names[index],
            module=self._series_modules[index],
            type=self._series_types[index],
            position=index,
            batches=gathered["batches"],
            ran=gathered["ran"][index],
            mean=values[0],
            std=values[1],
            near_zero=values[2],
            nonfinite=values[3],
            min=values[4],
            max=values[5],
            dead=dead,
            channels=channels,
            hist=gathered["hists"].get(index),
            model_output=index in self._model_outputs,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"batches": [...], "series": {name: {...}}}``."""
        return {
            "batches": self._gather()["batches"].tolist(),
            "series": {layer.name: layer.to_dict() for layer in self},
        }

    # ------------------------------------------------------------------ checks and pictures

    def findings(
        self,
        *,
        std: tuple[float, float] | None = None,
        max_dead: float | None = None,
        max_near_zero: float | None = None,
        max_std_growth: float | None = None,
        allow_nonfinite: bool = False,
    ) -> list[Finding]:
        """The health findings as data (see :func:`pytest_modelhooks.checks.activation_findings`).
        With no batch recorded there is nothing to judge: one finding says why, so that neither
        ``check()`` nor ``assert not stats.findings()`` passes vacuously."""
        from pytest_modelhooks.checks import Finding, activation_findings

        if not self.num_batches:
            return [Finding("", type(self.model).__name__, "batches", 0.0, ">= 1", None, self._why_empty())]
        return activation_findings(
            self,
            std=std,
            max_dead=max_dead,
            max_near_zero=max_near_zero,
            max_std_growth=max_std_growth,
            allow_nonfinite=allow_nonfinite,
        )

    def check(
        self,
        *,
        std: tuple[float, float] | None = None,
        max_dead: float | None = None,
        max_near_zero: float | None = None,
        max_std_growth: float | None = None,
        allow_nonfinite: bool = False,
    ) -> None:
        """Raise ``AssertionError`` listing every offending layer (see :meth:`findings`; also
        when nothing was recorded)."""
        __tracebackhide__ = True
        from pytest_modelhooks.checks import raise_for

        raise_for(
            self.findings(
                std=std,
                max_dead=max_dead,
                max_near_zero=max_near_zero,
                max_std_growth=max_std_growth,
                allow_nonfinite=allow_nonfinite,
            ),
            "activation",
        )

    def _why_empty(self) -> str:
        if type(self.model).__name__ == "OptimizedModule":
            return (
                "no batch was recorded: the model is torch.compile'd, and hooks registered after "
                "its first call never fire; create ActivationStats on the original module "
                "(model._orig_mod) before compiling it"
            )
        if not self._forwards:
            return (
                f"no batch was recorded: {type(self.model).__name__}'s forward did not run while "
                f"the hooks were on (run it inside the `with` block; a torch.compile'd copy "
                f"compiled before the hooks were added runs without them)"
            )
        if self._saw_meta:
            return (
                "no batch was recorded: the model ran on the meta device, whose tensors have shapes "
                "but no values (move it to a real device, e.g. model.to_empty(device='cpu') and "
                "initialise it, to measure activations)"
            )
        if self.train_only:
            return "no batch was recorded: train_only=True and the model ran only in eval mode"
        if not self._any_call:
            hooked = ", ".join(name or "(model)" for name in self.module_names[:8])
            more = f" and {len(self.module_names) - 8} more" if len(self.module_names) > 8 else ""
            return (
                f"no batch was recorded: {type(self.model).__name__}'s forward ran, but none of the "
                f"hooked modules ({hooked}{more}) did; a graph from torch.export or torch.fx may "
                f"run their operations inline without calling them (select modules that run, or "
                f"record the eager model)"
            )
        return "no batch was recorded: no hooked module returned a floating-point tensor"

    def plot(
        self,
        statistics: Sequence[str] = ("mean", "std", "near_zero"),
        path: str | Path | None = None,
        *,
        std: tuple[float, float] | None = None,
        max_near_zero: float | None = None,
    ) -> Figure:
        """Plot ``statistics`` per layer over batches (needs matplotlib), with the bounds given
        drawn as dashed lines; see :func:`pytest_modelhooks.plotting.plot_stats`."""
        from pytest_modelhooks.plotting import plot_stats

        return plot_stats(self, statistics, path, std=std, max_near_zero=max_near_zero)

    def color_dim(self, layer: int | str, path: str | Path | None = None) -> Figure:
        """The histogram-over-batches image of ``layer`` (needs ``with_hist=True``)."""
        from pytest_modelhooks.plotting import color_dim

        return color_dim(self, layer, path)

    def __repr__(self) -> str:
        return f"<ActivationStats: {len(self)} series, {self.num_batches} batches>"


# ====================================================================== gradients


@dataclass(frozen=True)
class ParamGradStats:
    """Gradient statistics of one parameter over the recorded backward passes (float64
    tensors, one value per step; NaN where the parameter got no gradient).

    >>> net = nn.Linear(4, 8)
    >>> with GradientStats(net) as grads:
    ...     net(torch.randn(3, 4)).sum().backward()
    >>> weight = grads["weight"]
    >>> weight.shape, weight.norm.shape, weight.got_grad
    ((8, 4), torch.Size([1]), True)
    """

    name: str
    module: str
    shape: tuple[int, ...]
    norm: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    max_abs: torch.Tensor
    nonfinite: torch.Tensor

    @property
    def got_grad(self) -> bool:
        """Whether a gradient arrived in any recorded step."""
        # the non-finite count is recorded whenever a gradient arrives, even a NaN one
        return bool((~torch.isnan(self.nonfinite)).any())


_GRAD_STATISTICS = ("norm", "mean", "std", "max_abs", "nonfinite")


@dataclass(frozen=True)
class SteppedOptimizer:
    """An optimizer whose ``step()`` ran on some of the model's parameters while
    :class:`GradientStats` recorded: its class name, how many steps, the model's trainable
    parameters in its param groups (qualified names), and those of them in a group whose
    learning rate is 0.

    >>> net = nn.Linear(3, 1)
    >>> optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> with GradientStats(net) as grads:
    ...     net(torch.randn(4, 3)).sum().backward()
    ...     optimizer.step()
    >>> grads.stepped_optimizers()
    [SteppedOptimizer(name='SGD', steps=1, params=('weight', 'bias'), zero_lr=())]
    """

    name: str
    steps: int
    params: tuple[str, ...]
    zero_lr: tuple[str, ...]


class _Seen:
    """What the step pre-hook saw of one optimizer (positions into GradientStats.params)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.steps = 0
        self.positions: dict[int, Any] = {}  # position -> its group's learning rate at the last step


_UNINITIALIZED = -1  # the version given to a lazy parameter's fingerprint before it exists


def _fingerprint(param: torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """A parameter's version counter and ``(sum, L2 norm)`` of its values accumulated in float64,
    on its device (no sync, no copy), or None where there are no values. Either changes when
    an optimizer updates it: in-place ops bump the counter (fused optimizer kernels do not),
    and any real update moves the float64 sums (an element's change of 1e-7 of its size moves
    them by ~1e-10 of theirs, a million times float64's resolution)."""
    if isinstance(param, UninitializedParameter):
        return _UNINITIALIZED, None  # a lazy module's, before its first forward: no values yet
    data = param.detach()
    dtensor = loaded_class("torch.distributed.tensor", "DTensor")
    if dtensor is not None and isinstance(data, dtensor):
        data = data.to_local()  # this rank's shard: it changes when the parameter does
    if data.is_meta or data.numel() == 0:  # no values (an FSDP2 rank may hold none): unknown
        return param._version, None
    if data.is_complex():
        data = torch.view_as_real(data)
    sums = torch.stack([data.sum(dtype=torch.float64), torch.linalg.vector_norm(data, dtype=torch.float64)])
    return param._version, sums


def _changed(
    before: list[tuple[int, torch.Tensor | None]], after: list[tuple[int, torch.Tensor | None]]
) -> list[bool | None]:
    """Per parameter: whether its fingerprint changed (None where there were no values to
    compare: meta, a lazy parameter never run, an empty shard). One host read per device."""
    changed: list[bool | None] = [
        True if old[0] != new[0] else None if old[1] is None or new[1] is None else False
        for old, new in zip(before, after, strict=True)
    ]
    by_device: dict[torch.device, list[int]] = {}
    for position, (old, new) in enumerate(zip(before, after, strict=True)):
        if changed[position] is False and old[1] is not None and new[1] is not None:
            by_device.setdefault(old[1].device, []).append(position)
    for positions in by_device.values():
        old_sums = torch.stack([before[position][1] for position in positions])  # type: ignore[misc]
        new_sums = torch.stack([after[position][1] for position in positions])  # type: ignore[misc]
        # NaN != NaN: a parameter gone non-finite counts as changed, which it did
        moved = (old_sums != new_sums).any(dim=1).cpu().tolist()
        for position, flag in zip(positions, moved, strict=True):
            changed[position] = bool(flag)
    return changed


def _is_zero_lr(lr: Any) -> bool:
    """Whether a param group's learning rate (a number or a tensor, read now) is 0."""
    try:
        return float(lr) == 0.0
    except (TypeError, ValueError, RuntimeError):
        return False  # no lr (an optimizer without one) or not a number


def _grad_on_host(grad: torch.Tensor) -> list[float]:
    flat = _host_flat(grad)
    mean, std, nonfinite, squares = _host_moments(flat)
    if nonfinite:
        return [math.sqrt(squares), math.nan, math.nan, math.nan, nonfinite]
    # max |g| from the extremes: one read, where abs().max() writes a full temporary first
    # (ResNet-50's gradients: 8 ms against 13 ms on this project's CPU)
    low, high = torch.aminmax(flat)
    return [math.sqrt(squares), mean, std, max(-float(low), float(high)), 0.0]


def _grad_on_device(grad: torch.Tensor) -> torch.Tensor:
    """Raw ``(norm, mean, variance, max |g|, finite count)`` on the device, in five launches;
    :func:`_finish_grads` completes them on the host."""
    acc = _accumulator(grad.dtype)
    g = grad if grad.dtype == acc else grad.to(acc)
    variance, mean = torch.var_mean(g)
    norm = torch.linalg.vector_norm(g)
    max_abs = torch.linalg.vector_norm(g, float("inf"))
    finite = torch.isfinite(grad).sum()
    # float64: a count above 2**24 is not exact in float32 (one NaN among 20M values vanished)
    return torch.stack([part.to(torch.float64) for part in (norm, mean, variance, max_abs, finite)])


def _sparse_grad_raw(grad: torch.Tensor) -> torch.Tensor:
    """Raw ``(norm, mean, variance, max |g|, finite count)`` of a sparse gradient (an
    ``nn.Embedding(sparse=True)``'s), as :func:`_grad_on_device` gives for its dense equal: the
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


def _finish_grads(raw: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """``(params, 5)`` raw rows (see :func:`_grad_on_device`) to :data:`_GRAD_STATISTICS`, on
    the host; ``sizes`` are the parameters' element counts."""
    rows = raw.to("cpu", torch.float64)
    rows[:, 2] = rows[:, 2].clamp(min=0).sqrt()
    # float64: a float32 count is off by one past 2**24 elements
    rows[:, 4] = torch.tensor(sizes, dtype=torch.float64) - rows[:, 4]
    return rows


def _pack_grad_rows(pending: dict[int, Any], sizes: Sequence[int]) -> tuple[torch.Tensor, bool]:
    """A step's rows as one tensor, and whether they are raw (device or fused rows, finished
    when read) or finished (host rows). A long run records 100,000s of steps: one tensor per
    step, not a list of Python floats per parameter. Host rows: one float64 tensor; device
    rows: stacked on their device (no sync); a model across devices or a fused pass that fell
    back mid-step: each row finished here (reads the device once; rare)."""
    values = list(pending.values())
    if all(isinstance(value, list) for value in values):
        return _packed(values, len(_GRAD_STATISTICS)), False
    if all(isinstance(value, torch.Tensor) for value in values) and len({v.device for v in values}) == 1:
        return torch.stack(values), True
    rows = [
        torch.tensor(value, dtype=torch.float64)
        if isinstance(value, list)
        else _finish_grads(value.reshape(1, -1), [sizes[position]])[0]
        for position, value in pending.items()
    ]
    return torch.stack(rows), False


def _weakly(owner: object, method: str) -> Callable[..., None]:
    """``owner.<method>`` as a hook that does not keep ``owner`` alive. A tensor hook is held
    by torch's C++ side, where the garbage collector cannot see the cycle parameter -> hook ->
    recorder -> model -> parameter: a recorder started and never stopped kept its model (and
    its gradients) for the life of the process, and a global optimizer hook would too."""
    ref = weakref.ref(owner)

    def hook(*args: Any) -> None:
        alive = ref()
        if alive is not None:
            getattr(alive, method)(*args)

    return hook


class GradientStats:
    """Record gradient statistics of ``model``'s parameters after each backward.

    Use it as a context manager around training steps. Each parameter's statistics are taken
    from its accumulated ``.grad`` right after backward writes it (a post-accumulate-grad
    hook), so ``zero_grad()`` anywhere in the loop does not matter, and gradient clipping,
    which runs after backward, does not hide an explosion from them. A *step* ends at the next
    forward of ``model``, when a parameter's gradient arrives again (a second backward),
    at :meth:`end_step`, or when the block ends. Parameters that require
    grad but never got one are reported by :meth:`unused`; frozen parameters are not tracked.
    ``fused=True`` reduces each gradient in one ``torch.compile``d pass, as
    :class:`ActivationStats` does.

    With mixed precision, pass the ``torch.amp.GradScaler`` as ``scaler=``: backward then writes
    gradients multiplied by the loss scale, and the statistics are divided by the scale of
    their step (read on the device, no sync). A step whose gradients overflowed is one the
    scaler skips (:meth:`skipped_steps`): the checks leave it out, and fail only when no step
    was finite. ``modules=`` (names, globs, types or modules, as elsewhere) records only the
    parameters of those modules (a fine-tuned head, the last blocks of a large model): fewer
    hooks, and checks about those alone.

    While recording, every optimizer's ``step()`` is watched (torch's global step pre-hook,
    host work only): :meth:`stepped_optimizers` says which stepped on the model and what they
    hold, :meth:`lost_before_step` which gradients were gone by then, and with the parameters'
    fingerprints at the block's two ends, :meth:`not_updated` and the checks say which
    parameters an optimizer should have changed but did not, and why.

    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    >>> with GradientStats(net) as grads:
    ...     net(torch.randn(5, 3)).sum().backward()
    >>> grads.num_steps, grads.unused()
    (1, [])
    """

    def __init__(
        self, model: nn.Module, *, modules: ModuleSpec = None, fused: bool = False, scaler: Any = None
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if scaler is not None and not (hasattr(scaler, "scale") and hasattr(scaler, "get_scale")):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.model = model
        self.fused = fused
        self.scaler = scaler
        self._scales: list[torch.Tensor | float | None] = []  # per step: the loss scale
        self._pending_scale: torch.Tensor | float | None = None
        self.params = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
        if modules is not None:
            # the trainable parameters of the selected modules (their submodules' included),
            # under the model's own names and in its order
            chosen = {
                id(param) for _, module in select_modules(model, modules) for param in module.parameters()
            }
            self.params = [(name, param) for name, param in self.params if id(param) in chosen]
            if not self.params:
                raise ValueError(
                    f"modules={modules!r} selects no trainable parameter of {type(model).__name__} "
                    f"(its parameters are frozen, or it has none)"
                )
        self._index = {id(param): position for position, (_, param) in enumerate(self.params)}
        self._sizes_known: list[int] | None = None  # element counts, once none is lazy
        self._saw_meta = False
        self._handles: list[Any] = []
        self._pending: dict[int, Any] = {}
        # per step: the parameters' positions in the order their gradients arrived, and their
        # rows packed (see _pack_grad_rows)
        self._steps: list[tuple[tuple[int, ...], Any, bool]] = []
        self._orders: dict[tuple[int, ...], tuple[int, ...]] = {}  # one tuple per distinct order
        self._cache: torch.Tensor | None = None
        # the parameters' fingerprints when recording began and when it ended (see updated())
        self._before: list[tuple[int, torch.Tensor | None]] | None = None
        self._after: list[tuple[int, torch.Tensor | None]] | None = None
        # the optimizers that stepped on these parameters, and the parameters whose gradient
        # was gone (None) when one stepped, though backward had just given them one
        self._optimizers: dict[int, _Seen] = {}
        self._lost: dict[int, str] = {}

    def __enter__(self) -> GradientStats:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Register the hooks (idempotent)."""
        if self._handles:
            return
        if self._before is None:
            with torch.no_grad():
                self._before = [_fingerprint(param) for _, param in self.params]
        self._after = None
        try:
            lazy: dict[int, nn.Module] = {}
            for name, param in self.params:
                if isinstance(param, UninitializedParameter):
                    # a lazy module's parameter takes no hook before its first forward
                    owner = self.model.get_submodule(name.rpartition(".")[0])
                    lazy[id(owner)] = owner
                    continue
                self._hook(param)
            for owner in lazy.values():
                self._handles.append(owner.register_forward_hook(self._materialized))
            if not isinstance(self.model, torch.jit.ScriptModule):
                # a forward starts a step. (TorchScript takes no Python module hooks; its
                # parameters take tensor hooks, and a step ends when a gradient arrives again.)
                starts = self.model.register_forward_pre_hook(lambda module, args: self.end_step())
                self._handles.append(starts)
            # every optimizer's step (a global hook, torch >= 2.0): which parameters it holds
            optimizer_module = importlib.import_module("torch.optim.optimizer")  # (not an attribute)
            register = getattr(optimizer_module, "register_optimizer_step_pre_hook", None)
            if register is not None:
                handle = register(_weakly(self, "_optimizer_step"))
                weakref.finalize(self, handle.remove)  # a process-wide hook: gone with us
                self._handles.append(handle)
        except BaseException:
            self.stop()
            raise

    def _optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Before any optimizer's ``step()``: note which of the model's parameters it holds (and
        their learning rates), and which of those had a gradient from the backward just
        recorded but none now (``zero_grad()`` between ``backward()`` and ``step()``). Host
        work only: no device read."""
        held: dict[int, Any] = {}
        for group in optimizer.param_groups:
            for param in group["params"]:
                position = self._index.get(id(param))
                if position is not None:
                    held[position] = group.get("lr")
        if not held:
            return  # another model's optimizer
        seen = self._optimizers.get(id(optimizer))
        if seen is None:
            seen = self._optimizers[id(optimizer)] = _Seen(type(optimizer).__name__)
        seen.steps += 1
        seen.positions.update(held)
        for position in held:
            if position in self._pending and self.params[position][1].grad is None:
                self._lost.setdefault(position, seen.name)

    def stepped_optimizers(self) -> list[SteppedOptimizer]:
        """The optimizers whose ``step()`` ran on the model's parameters while recording
        (seen through torch's global optimizer hooks), in the order they first stepped."""
        found = []
        for seen in self._optimizers.values():
            positions = sorted(seen.positions)
            zero_lr = [position for position in positions if _is_zero_lr(seen.positions[position])]
            found.append(
                SteppedOptimizer(
                    seen.name,
                    seen.steps,
                    tuple(self.params[position][0] for position in positions),
                    tuple(self.params[position][0] for position in zero_lr),
                )
            )
        return found

    def lost_before_step(self) -> dict[str, str]:
        """Parameters that got a gradient in backward whose ``.grad`` was None when an
        optimizer's ``step()`` then ran (so it skipped them), with that optimizer's name: the
        ``backward(); zero_grad(); step()`` order, or a ``.grad`` set to None by hand."""
        return {self.params[position][0]: name for position, name in sorted(self._lost.items())}

    def _hook(self, param: torch.Tensor) -> None:
        handle = param.register_post_accumulate_grad_hook(_weakly(self, "_record"))  # type: ignore[no-untyped-call]
        self._handles.append(handle)

    def _materialized(self, module: nn.Module, args: Any, output: Any) -> None:
        """After a lazy module's first forward, its parameters exist: hook them, and take their
        fingerprints now (their values start here)."""
        for param in module._parameters.values():
            if param is None or isinstance(param, UninitializedParameter):
                continue
            position = self._index.get(id(param))
            if position is None:
                continue  # frozen: not tracked
            if self._before is not None and self._before[position][0] == _UNINITIALIZED:
                with torch.no_grad():
                    self._before[position] = _fingerprint(param)
                self._hook(param)

    def _sizes(self) -> list[int]:
        """The parameters' element counts as the raw rows count them: real numbers, so two per
        complex element (a lazy parameter counts 0 until it is materialized)."""
        if self._sizes_known is not None:
            return self._sizes_known
        sizes = [
            0 if isinstance(param, UninitializedParameter) else param.numel() * (1 + param.is_complex())
            for _, param in self.params
        ]
        if not any(isinstance(param, UninitializedParameter) for _, param in self.params):
            self._sizes_known = sizes
        return sizes

    def stop(self) -> None:
        """Close the current step and remove every hook (idempotent)."""
        self.end_step()
        if self._handles and self._before is not None:
            with torch.no_grad():
                self._after = [_fingerprint(param) for _, param in self.params]
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _record(self, param: torch.Tensor) -> None:
        # (detached below: no graph is recorded, no no_grad() needed)
        grad = param.grad
        if grad is None:
            return
        if grad.is_meta:  # shapes without values: nothing to measure (findings say so)
            self._saw_meta = True
            return
        grad = grad.detach()
        dtensor = loaded_class("torch.distributed.tensor", "DTensor")
        if dtensor is not None and isinstance(grad, dtensor):
            # a shard (FSDP2, tensor parallelism): the whole gradient, gathered, gives the
            # statistics of the parameter (a shard's norm is not the norm, and its element
            # count is not the parameter's). Every rank records the same steps, in order.
            grad = grad.full_tensor()
        raw: Any
        if grad.layout != torch.strided:  # sparse (nn.Embedding(sparse=True)): its stored values
            raw = _sparse_grad_raw(grad)
        else:
            if grad.is_complex():  # over the real and imaginary parts (the norm is the complex one)
                grad = torch.view_as_real(grad.resolve_conj())
            raw = _compiled_call("GradientStats", _fused_grad_raw, grad.reshape(-1)) if self.fused else None
            if raw is None:
                self.fused = False  # (after compile failed: separate passes from now on)
                raw = _grad_on_host(grad) if grad.device.type == "cpu" else _grad_on_device(grad)
        index = self._index[id(param)]
        if index in self._pending:  # a second backward with no forward in between: a new step
            self.end_step()
        if not self._pending and self.scaler is not None:
            self._pending_scale = self._current_scale()
        self._pending[index] = raw

    def _current_scale(self) -> torch.Tensor | float | None:
        """The scaler's loss scale now, as a copy on its device (``update()`` changes it in
        place); None when the scaler is disabled."""
        scaler = self.scaler
        if not scaler.is_enabled():
            return None
        scale = getattr(scaler, "_scale", None)  # the device tensor behind get_scale()
        if isinstance(scale, torch.Tensor):
            return scale.detach().clone()
        return float(scaler.get_scale())

    def end_step(self) -> None:
        """Close the current step, if any gradient arrived since the last one."""
        if self._pending:
            order = tuple(self._pending)
            rows, raw = _pack_grad_rows(self._pending, self._sizes())
            self._steps.append((self._orders.setdefault(order, order), rows, raw))
            self._scales.append(self._pending_scale)
            self._pending = {}
            self._pending_scale = None
            self._cache = None

    @property
    def num_steps(self) -> int:
        """How many steps (backward passes) were recorded."""
        return len(self._steps) + (1 if self._pending else 0)

    def _gather(self) -> torch.Tensor:
        self.end_step()
        if self._cache is None:
            values = torch.full(
                (len(_GRAD_STATISTICS), len(self.params), len(self._steps)), math.nan, dtype=torch.float64
            )
            for column, (order, rows, raw) in enumerate(self._steps):
                if raw:
                    rows = _finish_grads(rows, [self._sizes()[at] for at in order])
                values[:, list(order), column] = rows.T
            if self.scaler is not None:
                # the loss scale multiplies every gradient: divide it out of the sizes (not the
                # non-finite count); one host read of every step's scale, here
                on_device = [scale.reshape(()) for scale in self._scales if isinstance(scale, torch.Tensor)]
                read = iter(torch.stack(on_device).double().cpu().tolist() if on_device else [])
                scales = [
                    next(read) if isinstance(scale, torch.Tensor) else 1.0 if scale is None else scale
                    for scale in self._scales
                ]
                values[:4] /= torch.tensor(scales, dtype=torch.float64)
            self._cache = values
        return self._cache

    def skipped_steps(self) -> list[int]:
        """With ``scaler=``: the steps whose gradients held an infinity or NaN (the scaler skips
        their optimizer step and lowers the scale). Without a scaler: none."""
        if self.scaler is None:
            return []
        nonfinite = torch.nan_to_num(self._gather()[4], nan=0.0)
        return [int(step) for step in (nonfinite > 0).any(dim=0).nonzero().flatten().tolist()]

    def backward_order(self, step: int = 0) -> list[str]:
        """The parameters whose gradient arrived in ``step``, in the order backward finished
        them: the layers nearest the loss first. A non-finite gradient starts where this order
        first meets one (the checks name it, and the finite one before it).

        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> with GradientStats(net) as grads:
        ...     net(torch.randn(5, 3)).sum().backward()
        >>> grads.backward_order()[0].startswith("2.")
        True
        """
        self.end_step()
        steps = range(len(self._steps))
        try:
            order = self._steps[steps[step]][0]
        except IndexError:
            raise IndexError(f"step={step} is out of range: {len(self._steps)} step(s) recorded") from None
        return [self.params[position][0] for position in order]

    def __len__(self) -> int:
        return len(self.params)

    def __iter__(self) -> Iterator[ParamGradStats]:
        return (self[index] for index in range(len(self)))

    def __getitem__(self, key: int | str) -> ParamGradStats:
        """The :class:`ParamGradStats` of a parameter, by position or qualified name."""
        names = [name for name, _ in self.params]
        if isinstance(key, str):
            if key not in names:
                raise KeyError(f"{key!r} is not a trainable parameter of {type(self.model).__name__}")
            index = names.index(key)
        else:
            index = range(len(names))[key]
        values = self._gather()[:, index]
        name, param = self.params[index]
        return ParamGradStats(name, name.rpartition(".")[0], tuple(param.shape), *values)

    def unused(self) -> list[str]:
        """Parameters that require grad but got no gradient in any recorded step."""
        return [stats.name for stats in self if not stats.got_grad]

    def updated(self) -> dict[str, bool | None]:
        """Per parameter: whether anything (an optimizer step) changed it between the start of
        recording and its end (or now, while recording); None where its values are on meta.
        Read from version counters and float64 sums taken at those two moments only: no copy
        of the weights, no cost per step. :meth:`not_updated` lists the suspects.

        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
        >>> optimizer = torch.optim.SGD(net[0].parameters(), lr=0.1)  # net[1] forgotten
        >>> with GradientStats(net) as grads:
        ...     net(torch.randn(5, 3)).sum().backward()
        ...     optimizer.step()
        >>> grads.updated()
        {'0.weight': True, '0.bias': True, '1.weight': False, '1.bias': False}
        >>> grads.not_updated()
        ['1.weight', '1.bias']
        """
        if self._before is None:
            return dict.fromkeys((name for name, _ in self.params), None)
        after = self._after
        if after is None:  # still recording: compare with now
            with torch.no_grad():
                after = [_fingerprint(param) for _, param in self.params]
        changed = _changed(self._before, after)
        return {name: flag for (name, _), flag in zip(self.params, changed, strict=True)}

    def not_updated(self) -> list[str]:
        """Parameters that got a gradient but never changed, while an optimizer stepped or
        others changed: left out of its param groups, a gradient of zeros, a ``.grad`` gone
        before ``step()`` (the checks tell these apart). Empty when no optimizer stepped and
        nothing changed (nothing to judge). Frozen parameters are not tracked."""
        updated = self.updated()
        if not any(updated.values()) and not self._optimizers:
            return []
        return [stats.name for stats in self if stats.got_grad and updated[stats.name] is False]

    def module_norms(self) -> dict[str, torch.Tensor]:
        """Per module (qualified name): the gradient norm over its own parameters, per step."""
        norms: dict[str, torch.Tensor] = {}
        for stats in self:
            squared = torch.nan_to_num(stats.norm, nan=0.0) ** 2
            norms[stats.module] = norms.get(stats.module, torch.zeros_like(squared)) + squared
        return {module: total.sqrt() for module, total in norms.items()}

    def total_norm(self) -> torch.Tensor:
        """Per step: the norm over every recorded parameter's gradient, the figure training
        logs show and ``clip_grad_norm_`` returns (and clips). The statistics are those of the
        gradients backward wrote, before any clipping: an explosion shows even where clipping
        keeps it from the optimizer.

        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
        >>> with GradientStats(net) as grads:
        ...     net(torch.randn(5, 3)).sum().backward()
        ...     clipped = nn.utils.clip_grad_norm_(net.parameters(), max_norm=1.0)
        >>> bool(torch.isclose(grads.total_norm()[0], clipped.double()))
        True
        """
        squared = torch.nan_to_num(self._gather()[0], nan=0.0) ** 2  # (parameters, steps)
        return squared.sum(dim=0).sqrt()

    def findings(
        self,
        *,
        max_norm: float | None = None,
        min_norm: float | None = None,
        require_grad: bool = True,
        require_update: bool | None = None,
    ) -> list[Finding]:
        """The gradient findings as data (see :func:`pytest_modelhooks.checks.gradient_findings`).
        With no backward recorded, one finding says so (rather than every parameter unused)."""
        from pytest_modelhooks.checks import Finding, gradient_findings

        if not self.num_steps:
            what = (
                f"{len(self.params)} parameter(s) require grad"
                if self.params
                else "no parameter requires grad"
            )
            note = f"no backward pass was recorded ({what}); call loss.backward() inside the `with` block"
            if self._saw_meta:
                note = "no backward pass was recorded: the gradients were on the meta device (no values)"
            return [Finding("", type(self.model).__name__, "steps", 0.0, ">= 1", None, note)]
        return gradient_findings(
            self,
            max_norm=max_norm,
            min_norm=min_norm,
            require_grad=require_grad,
            require_update=require_update,
        )

    def check(
        self,
        *,
        max_norm: float | None = None,
        min_norm: float | None = None,
        require_grad: bool = True,
        require_update: bool | None = None,
    ) -> None:
        """Raise ``AssertionError`` naming vanishing, exploding, non-finite and unused gradients,
        and parameters an optimizer left unchanged (``require_update``, see
        :func:`pytest_modelhooks.checks.gradient_findings`), or that no backward pass was
        recorded."""
        __tracebackhide__ = True
        from pytest_modelhooks.checks import raise_for

        found = self.findings(
            max_norm=max_norm, min_norm=min_norm, require_grad=require_grad, require_update=require_update
        )
        raise_for(found, "gradient")

    def plot(
        self,
        path: str | Path | None = None,
        *,
        max_norm: float | None = None,
        min_norm: float | None = None,
    ) -> Figure:
        """The gradient flow, per parameter and per module (needs matplotlib), with the bounds
        given drawn as dashed lines; see :func:`pytest_modelhooks.plotting.plot_grads`."""
        from pytest_modelhooks.plotting import plot_grads

        return plot_grads(self, path, max_norm=max_norm, min_norm=min_norm)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per parameter, every statistic per step (NaN as None)."""
        result: dict[str, Any] = {}
        for stats in self:
            result[stats.name] = {
                statistic: [
                    None if math.isnan(value) else value for value in getattr(stats, statistic).tolist()
                ]
                for statistic in _GRAD_STATISTICS
            }
        return result

    def __repr__(self) -> str:
        return f"<GradientStats: {len(self)} parameters, {self.num_steps} steps>"
