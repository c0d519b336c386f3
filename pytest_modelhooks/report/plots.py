"""Plots of recorded statistics (matplotlib, imported on first use)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from pytest_modelhooks.stats.activations import ActivationStats
    from pytest_modelhooks.stats.gradients import GradientStats


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
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")  # room for colorbars
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
    *,
    std: tuple[float, float] | None = None,
    max_near_zero: float | None = None,
) -> Figure:
    """One panel per statistic, one line per layer over the recorded batches. Up to 12 layers
    get a legend; more are colored by execution order (a colorbar names the first, middle and
    last), and the two lines that moved most in each panel are named at their end. With one
    batch recorded (a typical test) each panel is the statistic along the layers instead: one
    point per layer, in execution order. Bounds given (``std=(low, high)``, ``max_near_zero``)
    are drawn as dashed red lines on their panels.

    >>> with ActivationStats(model) as stats:  # doctest: +SKIP
    ...     for batch in batches:
    ...         model(batch)
    >>> plot_stats(stats, path="stats.png", std=(0.2, 5.0))  # doctest: +SKIP
    Figure(1500x400)
    """
    unknown = [name for name in statistics if name not in _TITLES]
    if unknown or not statistics:
        raise ValueError(
            f"statistics must be a non-empty subset of {', '.join(_TITLES)}, got {list(statistics)!r}"
        )
    layers = list(stats)
    bounds = {"std": list(std or ()), "near_zero": [] if max_near_zero is None else [max_near_zero]}
    if stats.num_batches == 1:
        return _plot_along_layers(layers, statistics, path, bounds)
    many = len(layers) > _LEGEND_LIMIT
    figure = _figure(5.0 * len(statistics) + (1.5 if many else 0.0), 4.0)
    axes = figure.subplots(1, len(statistics), squeeze=False)[0]
    colors: list[Any] = [None] * len(layers)
    if many:  # a legend of dozens of names says nothing: color by depth in the forward instead
        from matplotlib import colormaps

        cmap = colormaps["viridis"]
        colors = [cmap(index / (len(layers) - 1)) for index in range(len(layers))]
    for axis, statistic in zip(axes, statistics, strict=True):
        for layer, color in zip(layers, colors, strict=True):
            axis.plot(
                layer.batches.tolist(),
                layer[statistic].tolist(),
                label=_label(layer),
                linewidth=1,
                color=color,
            )
        if many:
            _name_outliers(axis, layers, statistic)
        _draw_bounds(axis, bounds.get(statistic, []))
        axis.set_title(_TITLES[statistic])
        axis.set_xlabel("batch")
        _whole_batches(axis)
    if layers and not many:
        axes[-1].legend(fontsize="small")
    if many:
        _depth_colorbar(figure, axes, layers)
    _save(figure, path)
    return figure


def _draw_bounds(axis: Any, values: list[float]) -> None:
    for value in values:
        axis.axhline(value, color="tab:red", linestyle="--", linewidth=0.8)


def _plot_along_layers(
    layers: list[Any], statistics: Sequence[str], path: str | Path | None, bounds: dict[str, list[float]]
) -> Figure:
    # lines over a single batch would be single invisible points: depth is the useful axis
    width = min(max(5.0, 0.25 * len(layers)), 12.0)  # wide enough for the names, within reason
    figure = _figure(width * len(statistics), 4.5)
    axes = figure.subplots(1, len(statistics), squeeze=False)[0]
    positions = list(range(len(layers)))
    step = max(1, len(layers) // 40)  # at most ~40 names on the axis
    for axis, statistic in zip(axes, statistics, strict=True):
        axis.plot(positions, [float(layer[statistic][0]) for layer in layers], marker="o", markersize=3)
        _draw_bounds(axis, bounds.get(statistic, []))
        axis.set_title(_TITLES[statistic])
        axis.set_xlabel("layer, in execution order")
        axis.set_xticks(
            positions[::step], [_label(layer) for layer in layers[::step]], rotation=90, fontsize="x-small"
        )
    _save(figure, path)
    return figure


def _whole_batches(axis: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # no batch 0.25


#: Up to this many layers get a legend; more are colored by execution order.
_LEGEND_LIMIT = 12


def _label(layer: Any) -> str:
    return str(layer.name or "(model)")  # as the findings table names the model's own output


def _name_outliers(axis: Any, layers: list[Any], statistic: str, count: int = 2) -> None:
    """Write the names of the ``count`` layers that stand out at the end of their line: those
    that moved most over the batches, or with one batch, the highest and the lowest."""
    ends: list[tuple[float, float, float, Any]] = []  # (score, x, y, layer)
    for layer in layers:
        values = layer[statistic]
        finite = ~torch.isnan(values)
        if not bool(finite.any()):
            continue
        seen = values[finite]
        x = float(layer.batches[finite][-1])
        ends.append((abs(float(seen[-1] - seen[0])), x, float(seen[-1]), layer))
    if not ends:
        return
    if any(score > 0 for score, *_ in ends):
        chosen = sorted(ends, key=lambda end: end[0], reverse=True)[:count]
    else:
        by_value = sorted(ends, key=lambda end: end[2])
        chosen = [by_value[-1], by_value[0]][:count]
    for _, x, y, layer in chosen:
        # inside the panel, just before the line's end
        axis.annotate(
            _label(layer), (x, y), fontsize="x-small", xytext=(-2, 2), textcoords="offset points", ha="right"
        )


def _depth_colorbar(figure: Any, axes: Any, layers: list[Any]) -> None:
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    mappable = ScalarMappable(norm=Normalize(0, len(layers) - 1), cmap=colormaps["viridis"])
    bar = figure.colorbar(mappable, ax=list(axes), fraction=0.03, pad=0.01)
    ticks = sorted({0, (len(layers) - 1) // 2, len(layers) - 1})
    bar.set_ticks(ticks)
    bar.set_ticklabels([_label(layers[tick]) for tick in ticks], fontsize="x-small")
    bar.set_label("layer, in execution order")


def color_dim(stats: ActivationStats, layer: int | str, path: str | Path | None = None) -> Figure:
    """The "colorful dimension" picture of a layer: its activation histogram (log scale) for
    each batch, batches along x, values along y. Needs ``ActivationStats(with_hist=True)``.

    >>> with ActivationStats(model, with_hist=True) as stats:  # doctest: +SKIP
    ...     for batch in batches:
    ...         model(batch)
    >>> color_dim(stats, "encoder.conv1", path="conv1.png")  # doctest: +SKIP
    """
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
    axis.set_title(f"{_label(record)}: log(1 + count) per value bin")
    axis.set_xlabel("batch")
    _whole_batches(axis)
    axis.set_ylabel("activation")
    # zoom onto the bins that hold values (a bin of margin each side): the default range is
    # wide, so that nothing is cut off, and most activations fill a small part of it
    occupied = (record.hist.sum(dim=0) > 0).nonzero().flatten().tolist()
    if occupied:
        width = (high - low) / record.hist.shape[1]
        axis.set_ylim(max(low, low + (occupied[0] - 1) * width), min(high, low + (occupied[-1] + 2) * width))
    if not math.isclose(low, high):
        axis.axhline(0.0, color="white", linewidth=0.5)
    _save(figure, path)
    return figure


def plot_grads(
    grads: GradientStats,
    path: str | Path | None = None,
    *,
    max_norm: float | None = None,
    min_norm: float | None = None,
) -> Figure:
    """The gradient flow: each parameter's gradient norm (log scale, model order, every step a
    dot, the median a line) beside its largest magnitude, so a vanishing or exploding stretch
    of the network shows as a slope; with several steps, a second panel has each module's norm
    over the steps. Parameters that never got a gradient, whose gradient was all zeros or
    non-finite are marked in red along the bottom (``x``, ``o``) or the top (``^``) and counted
    in the title; ``max_norm`` / ``min_norm`` are drawn as dashed red lines.

    >>> with GradientStats(model) as grads:  # doctest: +SKIP
    ...     loss_fn(model(x), y).backward()
    >>> plot_grads(grads, path="grads.png", max_norm=10.0)  # doctest: +SKIP
    Figure(600x450)
    """
    params = list(grads)
    many_steps = grads.num_steps > 1
    width = min(max(6.0, 0.25 * len(params)), 12.0)
    figure = _figure(width + (6.0 if many_steps else 0.0), 4.5)
    axes = figure.subplots(1, 2 if many_steps else 1, squeeze=False)[0]
    axis = axes[0]
    positions = list(range(len(params)))
    unused, zero, nonfinite = [], [], []
    medians, largest = [], []
    dots_x: list[int] = []
    dots_y: list[float] = []
    for position, param in zip(positions, params, strict=True):
        norms = param.norm[~torch.isnan(param.norm)]
        finite = norms[torch.isfinite(norms)]
        if not param.got_grad:
            unused.append(position)
        elif bool((param.nonfinite > 0).any()):
            nonfinite.append(position)
        elif bool((finite == 0).all()):
            zero.append(position)
        positive = finite[finite > 0]
        # zeros and infinities have no place on a log axis: the markers below say where they are
        dots_x += [position] * len(positive)
        dots_y += positive.tolist()
        medians.append(float(positive.median()) if len(positive) else math.nan)
        magnitudes = param.max_abs[torch.isfinite(param.max_abs) & (param.max_abs > 0)]
        largest.append(float(magnitudes.max()) if len(magnitudes) else math.nan)
    axis.plot(dots_x, dots_y, ".", color="tab:blue", alpha=0.3)  # every step's norm
    label = "norm (median over steps)" if many_steps else "norm"
    axis.plot(positions, medians, marker="o", markersize=3, color="tab:blue", label=label)
    axis.plot(
        positions, largest, marker="^", markersize=3, linewidth=0.8, color="tab:orange", label="max |g|"
    )
    axis.set_yscale("log")
    edge = axis.get_xaxis_transform()  # x in data, y in axes: 0.02 is the bottom, 0.98 the top
    for marks, symbol, y in ((unused, "x", 0.02), (zero, "o", 0.02), (nonfinite, "^", 0.98)):
        if marks:
            axis.plot(marks, [y] * len(marks), symbol, color="tab:red", transform=edge, clip_on=False)
    _draw_bounds(axis, [bound for bound in (min_norm, max_norm) if bound is not None])
    counts = [
        f"{len(marks)} {what}"
        for marks, what in ((unused, "unused"), (zero, "all zero"), (nonfinite, "non-finite"))
        if marks
    ]
    axis.set_title("gradient norm per parameter" + (f" ({', '.join(counts)})" if counts else ""))
    axis.set_xlabel("parameter, in model order")
    step = max(1, len(params) // 40)
    axis.set_xticks(
        positions[::step], [param.name for param in params[::step]], rotation=90, fontsize="x-small"
    )
    axis.legend(fontsize="small")
    if many_steps:
        _plot_module_norms(axes[1], grads)
    _save(figure, path)
    return figure


def _plot_module_norms(axis: Any, grads: GradientStats) -> None:
    # modules whose parameters never got a gradient have no line (the first panel marks them)
    norms = {name: values for name, values in grads.module_norms().items() if bool((values > 0).any())}
    names = list(norms)
    many = len(names) > _LEGEND_LIMIT
    if many:
        from matplotlib import colormaps

        cmap = colormaps["viridis"]
    for index, (name, values) in enumerate(norms.items()):
        shown = torch.where(values > 0, values, torch.full_like(values, math.nan))  # log axis
        color = cmap(index / (len(names) - 1)) if many else None
        axis.plot(range(len(values)), shown.tolist(), linewidth=1, color=color, label=name or "(model)")
    axis.set_yscale("log")
    axis.set_title("gradient norm per module")
    axis.set_xlabel("step")
    _whole_batches(axis)
    if names and not many:
        axis.legend(fontsize="small")
