"""Dead units: the running maximum of every channel over the recorded batches (a channel is dead
while its maximum stays <= 0), and which values are rectified (only there is "never above zero"
dead): a ReLU-family module's input, or a tensor ``F.relu`` and friends read.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pytest_modelhooks._torch import TorchDispatchMode, overload_packet

#: Rectifiers: below zero they give zero, so a channel never above zero on their input is dead.
RECTIFIERS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
_RECTIFIER_OPS = frozenset({"relu", "relu_", "relu6", "relu6_"})


class ChannelMaxima:
    """Per series, the maximum of each channel over the batches recorded, kept on the device.

    A series reduced alone updates its own row; the series reduced together (outputs held to
    the batch's end, see :mod:`pytest_modelhooks.stats.held`) update their group's
    ``(k, channels)`` tensor with one ``maximum`` while the group stays the same batch after
    batch, the usual case.

    >>> maxima = ChannelMaxima()
    >>> maxima.update(0, torch.tensor([-1.0, 2.0]))
    >>> maxima.update_rows((1, 2), torch.tensor([[0.0, 1.0, 3.0], [-2.0, -1.0, 5.0]]))
    >>> maxima.update(0, torch.tensor([-0.5, 1.0]))
    >>> maxima.dead()
    {0: (0.5, 2), 1: (0.3333333333333333, 3), 2: (0.6666666666666666, 3)}
    """

    def __init__(self) -> None:
        self._rows: dict[int, torch.Tensor] = {}  # series -> its maxima, reduced alone
        self._groups: dict[tuple[int, ...], torch.Tensor] = {}  # series ids -> (k, channels)
        self._group_of: dict[int, tuple[int, ...]] = {}  # series -> its group there

    def __bool__(self) -> bool:
        return bool(self._rows or self._groups)

    def update(self, series: int, current: torch.Tensor) -> None:
        """Fold one series' maxima of this batch in (a change of channel count starts again)."""
        if series in self._group_of:  # reduced with others until now: its row leaves the group
            self._ungroup(self._group_of[series])
        seen = self._rows.get(series)
        if seen is None or seen.shape != current.shape:
            self._rows[series] = current
        else:
            # not in place: a running max made under inference_mode cannot be updated outside it
            self._rows[series] = torch.maximum(seen, current)

    def update_rows(self, ids: tuple[int, ...], current: torch.Tensor) -> None:
        """:meth:`update` for a group reduced together, ``current`` of shape ``(len(ids),
        channels)``. A new group (the first batch held more, or a budget split a batch
        elsewhere) takes its series' maxima so far, once."""
        seen = self._groups.get(ids)
        if seen is not None and seen.shape == current.shape:
            self._groups[ids] = torch.maximum(seen, current)
            return
        for series in ids:
            if series in self._group_of:
                self._ungroup(self._group_of[series])
        earlier = [self._rows.pop(series, None) for series in ids]
        if any(row is not None for row in earlier):
            # a row whose channels changed starts again from this batch, as in update()
            rows = [
                row if row is not None and row.shape == now.shape else now
                for row, now in zip(earlier, current.unbind(0), strict=True)
            ]
            current = torch.maximum(torch.stack(rows), current)
        self._groups[ids] = current
        for series in ids:
            self._group_of[series] = ids

    def _ungroup(self, ids: tuple[int, ...]) -> None:
        for series, row in zip(ids, self._groups.pop(ids).unbind(0), strict=True):
            del self._group_of[series]
            self._rows[series] = row

    def dead(self) -> dict[int, tuple[float, int]]:
        """Per series: (the fraction of channels never above zero, the number of channels); one
        transfer per series reduced alone and per group."""
        found: dict[int, tuple[float, int]] = {}
        for series, row in self._rows.items():
            never_positive = row.cpu() <= 0  # NaN compares False: not counted dead
            found[series] = (float(never_positive.double().mean()), never_positive.numel())
        for ids, rows in self._groups.items():
            fractions = (rows.cpu() <= 0).double().mean(dim=1).tolist()
            for series, fraction in zip(ids, fractions, strict=True):
                found[series] = (fraction, rows.shape[1])
        return found


class RectifierOps(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Hands the tensor each rectifying ATen op (``F.relu``, ``torch.relu``, in-place too) reads
    to ``seen``; everything runs as it would (a dispatch mode changes no code path the model
    takes, unlike a torch-function mode, which turns off fused fast paths)."""

    def __init__(self, seen: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.seen = seen

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if args and overload_packet(func).__name__ in _RECTIFIER_OPS:
            self.seen(args[:1])
        return func(*args, **(kwargs or {}))
