"""Pictures of activation statistics (the optional ``plot`` extra: matplotlib).

Rendering is headless (the Agg canvas is used directly, whatever backend pyplot would pick), and
every function returns the matplotlib ``Figure`` and, given ``path``, writes a PNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from pytest_modelhooks.stats import ActivationStats

__all__ = ["color_dim", "plot_stats"]

_TITLES = {
    "mean": "mean",
    "std": "std",
    "near_zero": "fraction near zero",
    "nonfinite": "non-finite values",
    "min": "min",
    "max": "max",
}


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError("plots need matplotlib: pip install 'pytest-modelhooks[plot]'") from error
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)  # attaches itself: no pyplot, no global state, no display
    return figure


def _save(figure: Figure, path: str | Path | None) -> None:
    if path is not None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(target, format="png")


def plot_stats(
    stats: ActivationStats,
    statistics: Sequence[str] = ("mean", "std", "near_zero"),
    path: str | Path | None = None,
) -> Figure:
    """One panel per statistic, one line per layer over the recorded batches."""
    unknown = [name for name in statistics if name not in _TITLES]
    if unknown or not statistics:
        raise ValueError(
            f"statistics must be a non-empty subset of {', '.join(_TITLES)}, got {list(statistics)!r}"
        )
    figure = _figure(5.0 * len(statistics), 4.0)
    axes = figure.subplots(1, len(statistics), squeeze=False)[0]
    layers = list(stats)
    for axis, statistic in zip(axes, statistics, strict=True):
        for layer in layers:
            axis.plot(
                layer.batches.tolist(), layer[statistic].tolist(), label=layer.name or layer.type, linewidth=1
            )
        axis.set_title(_TITLES[statistic])
        axis.set_xlabel("batch")
    if layers and len(layers) <= 12:
        axes[-1].legend(fontsize="small")
    figure.tight_layout()
    _save(figure, path)
    return figure


def color_dim(stats: ActivationStats, layer: int | str, path: str | Path | None = None) -> Figure:
    """The "colorful dimension" picture of a layer: its activation histogram (log scale) for
    each batch, batches along x, values along y. Needs ``ActivationStats(with_hist=True)``."""
    record = stats[layer]
    if record.hist is None:
        raise ValueError(
            f"no histograms for {record.name!r}: record with ActivationStats(..., with_hist=True)"
        )
    low, high = stats.hist_range
    figure = _figure(8.0, 4.0)
    axis = figure.subplots()
    image: Any = torch.log1p(record.hist.T.float())
    axis.imshow(
        image.tolist(),
        origin="lower",
        aspect="auto",
        extent=(0, max(len(record.batches), 1), low, high),
        cmap="viridis",
    )
    axis.set_title(f"{record.name or record.type}: log(1 + count) per value bin")
    axis.set_xlabel("batch")
    axis.set_ylabel("activation")
    if not math.isclose(low, high):
        axis.axhline(0.0, color="white", linewidth=0.5)
    figure.tight_layout()
    _save(figure, path)
    return figure
