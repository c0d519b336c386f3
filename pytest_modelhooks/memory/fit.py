"""The largest batch whose training step fits a memory budget: a search over fake traces."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from pytest_modelhooks.memory.report import MemoryReport
from pytest_modelhooks.memory.step import model_memory
from pytest_modelhooks.units import format_bytes, parse_bytes


@dataclass(frozen=True)
class BatchFit:
    """The answer of :func:`max_batch_size`: the largest batch that fits (0: not even one), its
    peak, the peak of the batch after it, and how many traces the search took."""

    batch_size: int
    peak_bytes: int | None
    next_peak_bytes: int | None
    budget_bytes: int
    traces: int

    def __str__(self) -> str:
        if not self.batch_size:
            return (
                f"no batch fits {format_bytes(self.budget_bytes)}: batch 1 peaks at "
                f"{format_bytes(self.next_peak_bytes or 0)}"
            )
        after = (
            f", batch {self.batch_size + 1} {format_bytes(self.next_peak_bytes)}"
            if self.next_peak_bytes is not None
            else ""
        )
        return (
            f"batch {self.batch_size} fits {format_bytes(self.budget_bytes)}: peak "
            f"{format_bytes(self.peak_bytes or 0)}{after}"
        )


def max_batch_size(
    model: nn.Module,
    make_input: Callable[[int], Any],
    budget: object = "80GiB",
    *,
    limit: int = 1 << 20,
    **options: Any,
) -> BatchFit:
    """The largest batch size ``b <= limit`` for which the step that
    :func:`~pytest_modelhooks.memory.model_memory` measures (same ``options``) on
    ``make_input(b)`` peaks within ``budget`` (bytes or ``"80GiB"``).

    The peak grows with the batch (activations, saved tensors and temporaries scale with it;
    parameters and optimizer state do not): the search doubles the batch until it no longer
    fits, then halves the interval, so it takes about ``2 * log2(answer)`` traces.

    >>> from torch import nn
    >>> import torch
    >>> net = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 10))
    >>> fit = max_batch_size(net, lambda b: torch.randn(b, 256), budget="16MiB")
    >>> fit.peak_bytes <= 16 * 2**20 < fit.next_peak_bytes
    True
    """
    budget_bytes = parse_bytes(budget, "budget")
    if not (isinstance(limit, int) and limit >= 1):
        raise ValueError(f"limit must be a positive int, got limit={limit!r}")
    if not callable(make_input):
        raise TypeError(f"make_input must be a function of the batch size, got {type(make_input).__name__}")
    peaks: dict[int, int] = {}

    def peak(batch: int) -> int:
        if batch not in peaks:
            report: MemoryReport = model_memory(model, make_input(batch), **options)
            peaks[batch] = report.peak_bytes
        return peaks[batch]

    if peak(1) > budget_bytes:
        return BatchFit(0, None, peaks[1], budget_bytes, len(peaks))
    low, high = 1, None  # low fits; high (when known) does not
    while high is None:
        candidate = min(low * 2, limit)
        if candidate == low:
            return BatchFit(low, peaks[low], None, budget_bytes, len(peaks))
        if peak(candidate) <= budget_bytes:
            low = candidate
        else:
            high = candidate
    while high - low > 1:
        middle = (low + high) // 2
        if peak(middle) <= budget_bytes:
            low = middle
        else:
            high = middle
    return BatchFit(low, peaks[low], peak(low + 1), budget_bytes, len(peaks))
