"""The text of records as snapshots store it, and the context table a failing check's report
shows (every layer's statistics, the offending ones marked).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from pytest_modelhooks.findings import Finding, format_number, text_table


def snapshot_text(data: Any) -> str:
    """The text stored for ``data``: a ModelSummary, LayerSizes, ActivationStats, GradientStats,
    MemoryReport, StateDictSpec, Fingerprints, a list of findings (graph breaks,
    recompilations, export problems) or str.

    >>> import torch
    >>> from torch import nn
    >>> from pytest_modelhooks import model_sizes
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    >>> print(snapshot_text(model_sizes(net, input=torch.zeros(1, 4))))
    Layer sizes
    0 (Linear)  (1, 8)
    1 (ReLU)    (1, 8)
    <BLANKLINE>
    """
    from pytest_modelhooks.checkpoint.spec import StateDictSpec
    from pytest_modelhooks.divergence.prints import Fingerprints
    from pytest_modelhooks.memory.report import MemoryReport
    from pytest_modelhooks.sizes import LayerSizes
    from pytest_modelhooks.stats.activations import ActivationStats
    from pytest_modelhooks.stats.gradients import GradientStats
    from pytest_modelhooks.summary.records import ModelSummary

    if isinstance(data, ModelSummary):
        return str(data) + "\n"
    if isinstance(data, LayerSizes):
        return "Layer sizes\n" + str(data) + "\n"
    if isinstance(data, ActivationStats):
        return _stats_text(data)
    if isinstance(data, GradientStats):
        return _grads_text(data)
    if isinstance(data, MemoryReport):
        return str(data)
    if isinstance(data, (StateDictSpec, Fingerprints)):
        return str(data) + "\n"
    if isinstance(data, str):
        return data if data.endswith("\n") else data + "\n"
    if isinstance(data, (list, tuple)) and all(isinstance(item, Finding) for item in data):
        return findings_text(data)
    raise TypeError(
        "model_snapshot stores ModelSummary, LayerSizes, ActivationStats, GradientStats, "
        "MemoryReport, StateDictSpec, Fingerprints, a list of findings or str, "
        f"got {type(data).__name__}"
    )


#: where a finding's note starts with its place in the source: ``path:line `code`: ``
_PLACE = re.compile(r"^(?P<path>\S+?):\d+ `(?P<source>[^`]*)`: ")


def findings_text(findings: Sequence[Finding]) -> str:
    """Findings as a snapshot stores them: a row each, labelled by the layer, its type and the
    source line where there is one, without line numbers (code moving down a file is no
    change), so that a new graph break reads as an added row.

    >>> print(findings_text([Finding("gate", "Gate", "graph break", 1.0, "0", None,
    ...     "m.py:8 `if y.mean() > 0:`: a Python branch on a tensor's value")]), end="")
    Findings: 1
    layer                           statistic    observed  note
    gate (Gate) `if y.mean() > 0:`  graph break  1         a Python branch on a tensor's value
    """
    rows = [["layer", "statistic", "observed", "note"]]
    seen: dict[str, int] = {}
    for finding in findings:
        note = " ".join(finding.note.split())
        label = f"{finding.layer or '(model)'} ({finding.layer_type})"
        place = _PLACE.match(note)
        if place:
            label += f" `{' '.join(place['source'].split())}`"
            note = note[place.end() :]
        label = re.sub(r"\s{2,}", " ", label)
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:  # the same place twice (two recompilations): told apart
            label += f" #{seen[label]}"
        observed = format_number(finding.observed)
        rows.append([label, finding.statistic, observed, note])
    return f"Findings: {len(findings)}\n" + text_table(rows) + "\n"


def _stats_text(stats: Any) -> str:
    header = ["layer", "type", "mean", "std", "near_zero", "dead"]
    rows = [header]
    for layer in stats:
        rows.append(
            [
                layer.name or "(model)",
                layer.type,
                f"{_nanmean(layer.mean):.6g}",
                f"{_nanmean(layer.std):.6g}",
                f"{_nanmean(layer.near_zero):.6g}",
                "-" if layer.dead is None else f"{layer.dead:.6g}",
            ]
        )
    return f"Activation statistics (mean over {stats.num_batches} batches)\n" + text_table(rows) + "\n"


def _grads_text(grads: Any) -> str:
    # which parameters get a gradient, and how large: norm and max |g| averaged over the steps
    rows = [["parameter", "shape", "norm", "max_abs", "nonfinite"]]
    for param in grads:
        shape = "x".join(str(size) for size in param.shape) or "scalar"
        if not param.got_grad:
            rows.append([param.name, shape, "-", "-", "no gradient"])
            continue
        rows.append(
            [
                param.name,
                shape,
                f"{_nanmean(param.norm):.6g}",
                f"{_nanmean(param.max_abs):.6g}",
                f"{sum(value for value in param.nonfinite.tolist() if not math.isnan(value)):g}",
            ]
        )
    return f"Gradient statistics (mean over {grads.num_steps} steps)\n" + text_table(rows) + "\n"


def context_text(data: Any, marked: Any = (), *, limit: int = 40, around: int = 2) -> str:
    """The statistics of every layer an ``ActivationStats`` recorded (or every parameter a
    ``GradientStats`` tracked), rows in ``marked`` (names; "" is the model) flagged with ``>``: the context a
    failed check's table leaves out, such as how a std grew towards the layer that broke its
    bound. Beyond ``limit`` rows only the flagged ones and ``around`` rows either side are kept.

    >>> import torch
    >>> from torch import nn
    >>> from pytest_modelhooks import ActivationStats
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    >>> with ActivationStats(net) as stats:
    ...     _ = net(torch.ones(2, 4))
    >>> text = context_text(stats, marked={"0"})
    >>> print(text.splitlines()[0])
    Statistics of every recorded layer over 1 batch (> marks a finding)
    >>> [line.split()[:3] for line in text.splitlines()[1:]]
    [['layer', 'type', 'mean'], ['>', '0', 'Linear']]
    """
    from pytest_modelhooks.stats.activations import ActivationStats
    from pytest_modelhooks.stats.gradients import GradientStats

    if isinstance(data, ActivationStats):
        title, legend, rows = _activation_rows(data)
        several = data.num_batches > 1
    elif isinstance(data, GradientStats):
        title, legend, rows = _gradient_rows(data)
        several = data.num_steps > 1
    else:
        raise TypeError(f"context_text takes ActivationStats or GradientStats, got {type(data).__name__}")
    names = [row[0] for row in rows[1:]]
    marked = {name or "(model)" for name in marked}  # (findings name the model "")
    flags = [name in marked for name in names]
    rows = [["", *rows[0]]] + [[">" if flag else "", *row] for flag, row in zip(flags, rows[1:], strict=True)]
    kept: list[int] | range = range(len(names))
    if len(names) > limit and any(flags):
        near = {i for i, flag in enumerate(flags) if flag for i in range(i - around, i + around + 1)}
        kept = [i for i in range(len(names)) if i in near or i in (0, len(names) - 1)]
    notes = ([legend] if several else []) + (["> marks a finding"] if marked else [])
    if notes:
        title += f" ({'; '.join(notes)})"
    lines = text_table(rows).splitlines()
    out = [title, lines[0]]
    previous = -1
    for i in kept:
        if i > previous + 1:
            out.append(f"  ... {_count(i - previous - 1, 'row')}")
        out.append(lines[i + 1])
        previous = i
    if previous < len(names) - 1:
        out.append(f"  ... {_count(len(names) - 1 - previous, 'row')}")
    return "\n".join(out) + "\n"


Rows = list[list[str]]


def _activation_rows(stats: Any) -> tuple[str, str, Rows]:
    title = f"Statistics of every recorded layer over {_count(stats.num_batches, 'batch')}"
    legend = "means; min and max the extremes, nonfinite the total"
    rows = [["layer", "type", "mean", "std", "near_zero", "dead", "min", "max", "nonfinite"]]
    for layer in stats:
        rows.append(
            [
                layer.name or "(model)",
                layer.type,
                _short(_nanmean(layer.mean)),
                _short(_nanmean(layer.std)),
                _short(_nanmean(layer.near_zero)),
                "-" if layer.dead is None else _short(layer.dead),
                _short(_nanreduce(layer.min, min)),
                _short(_nanreduce(layer.max, max)),
                _short(_nanreduce(layer.nonfinite, sum)),
            ]
        )
    return title, legend, rows


def _gradient_rows(grads: Any) -> tuple[str, str, Rows]:
    title = f"Gradients of every tracked parameter over {_count(grads.num_steps, 'step')}"
    legend = "norm the mean; max_abs the largest, nonfinite the total"
    # whether each parameter changed while recording: the optimizer bugs' evidence
    updated = grads.updated()
    rows = [["parameter", "shape", "norm", "max_abs", "nonfinite", "updated"]]
    for param in grads:
        shape = "x".join(str(size) for size in param.shape) or "scalar"
        changed = {True: "yes", False: "no", None: "-"}[updated.get(param.name)]
        if not param.got_grad:
            rows.append([param.name, shape, "-", "-", "no gradient", changed])
            continue
        rows.append(
            [
                param.name,
                shape,
                _short(_nanmean(param.norm)),
                _short(_nanreduce(param.max_abs, max)),
                _short(_nanreduce(param.nonfinite, sum)),
                changed,
            ]
        )
    return title, legend, rows


def _count(number: int, noun: str) -> str:
    plural = noun + ("es" if noun.endswith("ch") else "s")
    return f"{number} {noun if number == 1 else plural}"


def _short(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4g}"


def _nanreduce(values: Any, reduce: Any) -> float:
    finite = [value for value in values.tolist() if not math.isnan(value)]
    return float(reduce(finite)) if finite else math.nan


def _nanmean(values: Any) -> float:
    finite = [value for value in values.tolist() if not math.isnan(value)]
    return sum(finite) / len(finite) if finite else math.nan
