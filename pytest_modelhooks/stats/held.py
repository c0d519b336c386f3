"""Outputs held from their module's hook to the end of the batch, then reduced together: on a
GPU a training step is bound by kernel launches, and reducing each activation in its own hook
costs ~9 launches per module. Held tensors of one device, dtype, shape and channel axis are
stacked and reduced in one set of passes (:func:`reduce_rows`), so a batch's launches grow
with its shapes, not with its modules.

A held tensor's values must still be its module's output when it is reduced. Each tensor's
version counter is read when it is held and again when it is reduced: a tensor changed in
place in between (a BatchNorm's output under ``ReLU(inplace=True)``, a residual ``out +=
identity``) moved it. A series is held itself only once a batch has shown that its tensor
stays as it was; until then, and for good once its tensor moved, a copy is held (one launch in
the hook), and on the first batch the tensor too (:meth:`HeldOutputs.watch`), to be looked at
again at the end. A tensor held itself that moved all the same (the model took another path)
is not recorded in that batch, and is copied from then on.

Holding costs memory where nothing else keeps the outputs alive (``no_grad``, or a tensor no
backward needs): at most ``max_bytes`` are held before a reduction runs mid-batch, and a stack
copies at most :data:`STACK_BYTES` at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pytest_modelhooks.stats.reduce import compiled_call, fused_rows, reduce_rows

#: The most bytes one stack copies; a bigger tensor is reduced alone, without a copy (at that
#: size its passes cost far more than their launches).
STACK_BYTES = 128 * 2**20

#: The default of ``ActivationStats(max_held=...)``.
HELD_BYTES = 256 * 2**20


@dataclass
class Reduced:
    """What one reduction of the held outputs gave."""

    #: per device and group: ``(series ids, (k, 6) raw rows on the device, element counts)``
    blocks: list[tuple[list[int], torch.Tensor, list[int]]] = field(default_factory=list)
    #: ``(series ids, (k, channels) maxima per channel)`` of the groups with a channel axis
    channel_max: list[tuple[tuple[int, ...], torch.Tensor]] = field(default_factory=list)
    #: watched series whose tensor stayed as it was: they can be held from now on
    unchanged: list[int] = field(default_factory=list)
    #: series whose tensor changed in place after its hook (held ones are not recorded this batch)
    changed: list[int] = field(default_factory=list)


_COPY = -1  # the version noted for a copy: nothing else can change it


def _bytes(x: torch.Tensor) -> int:
    return x.nbytes


class HeldOutputs:
    """The outputs of one batch held for reduction, grouped by device, dtype, shape and
    channel axis; see the module docstring.

    >>> held = HeldOutputs(eps=0.05, wanted=frozenset({"mean", "std"}), max_bytes=2**20)
    >>> for series in range(3):
    ...     _ = held.hold(series, torch.ones(4, 8) * series, axis=None)
    >>> reduced = held.reduce()
    >>> [(ids, tuple(raw.shape)) for ids, raw, _ in reduced.blocks]
    [([0, 1, 2], (3, 6))]
    >>> reduced.blocks[0][1][:, 0].tolist()  # the means
    [0.0, 1.0, 2.0]
    """

    def __init__(
        self, eps: float, wanted: frozenset[str], max_bytes: int, fused: tuple[bool, ...] | None = None
    ) -> None:
        self.eps = eps
        self.wanted = wanted
        self.max_bytes = max_bytes
        #: with ``fused=True``: the flags of :func:`fused_rows` (moments, near zero, finite,
        #: extremes), one compiled pass per group; None once it could not compile
        self.fused = fused
        self._groups: dict[tuple[Any, ...], list[tuple[int, torch.Tensor, int]]] = {}
        self._watched: list[tuple[int, torch.Tensor, int]] = []
        self.bytes = 0

    def __bool__(self) -> bool:
        return bool(self._groups or self._watched)

    def hold(self, series: int, x: torch.Tensor, axis: int | None, copy: bool = False) -> bool:
        """Hold ``x`` (a plain, detached tensor, or with ``copy`` one nobody else has) for
        ``series``; True when the held bytes are now over the budget (the caller reduces
        them)."""
        key = (x.device, x.dtype, x.shape, axis)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = []
        group.append((series, x, _COPY if copy else x._version))
        self.bytes += x.nbytes
        return self.bytes > self.max_bytes

    def watch(self, series: int, x: torch.Tensor) -> bool:
        """Keep ``x``, already reduced, to see at the next reduction whether it changed in
        place since; True when over the budget, as :meth:`hold`."""
        self._watched.append((series, x, x._version))
        self.bytes += _bytes(x)
        return self.bytes > self.max_bytes

    def clear(self) -> None:
        self._groups = {}
        self._watched = []
        self.bytes = 0

    def reduce(self) -> Reduced:
        """Reduce everything held (no host read) and let it go."""
        reduced = Reduced()
        for series, x, version in self._watched:
            (reduced.unchanged if x._version == version else reduced.changed).append(series)
        for (_, _, _, axis), entries in self._groups.items():
            kept = []
            for series, x, version in entries:
                if version == _COPY or x._version == version:
                    kept.append((series, x))
                else:
                    reduced.changed.append(series)
            for chunk in _chunks(kept):
                tensors = [x for _, x in chunk]
                stacked = tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)
                raw, channel_max = self._rows(stacked, axis)
                ids = [series for series, _ in chunk]
                reduced.blocks.append((ids, raw, [x.numel() for x in tensors]))
                if channel_max is not None:
                    reduced.channel_max.append((tuple(ids), channel_max))
        self.clear()
        return reduced

    def _rows(self, stacked: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:func:`reduce_rows`, or with ``fused`` one compiled pass plus the channel maxima."""
        if self.fused is not None:
            flat = stacked.reshape(stacked.shape[0], -1)
            correction = 1 if flat.shape[1] > 1 else 0
            raw = compiled_call("ActivationStats", fused_rows, flat, self.eps, correction, *self.fused)
            if raw is not None:
                channel_max = None
                if axis is not None:
                    channel_max = stacked.amax(dim=tuple(d for d in range(1, stacked.dim()) if d != axis + 1))
                return raw, channel_max
            self.fused = None  # (after one warning: separate passes from now on)
        return reduce_rows(stacked, self.eps, self.wanted, axis)


def _chunks(entries: list[tuple[int, torch.Tensor]]) -> list[list[tuple[int, torch.Tensor]]]:
    """``entries`` in runs of at most :data:`STACK_BYTES` (a bigger tensor alone)."""
    chunks: list[list[tuple[int, torch.Tensor]]] = []
    size = 0
    for entry in entries:
        nbytes = _bytes(entry[1])
        if not chunks or size + nbytes > STACK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(entry)
        size += nbytes
    return chunks
