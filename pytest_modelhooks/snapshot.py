"""syrupy snapshots of model summaries, layer sizes and activation statistics.

:class:`ModelSnapshotExtension` stores each snapshot as a plain ``.txt`` file under
``__snapshots__/<test file>/<test name>.txt``: the same text ``str()`` gives, readable in a code
review. On a mismatch the report starts with what changed, layer by layer
(``layer3.1.conv2 (Conv2d): output (1, 256, 14, 14) -> (1, 256, 7, 7); params +1.20 M``),
before syrupy's line diff. Numbers compare within ``atol + rtol * |snapshot|`` (both 0 by
default: exact), which suits statistics snapshots. The class is importable by dotted path, as
pytest-xdist needs: ``pytest_modelhooks.snapshot.ModelSnapshotExtension``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from syrupy.extensions.single_file import SingleFileSnapshotExtension, WriteMode

__all__ = ["ModelSnapshotExtension", "context_text", "describe_changes", "snapshot_text"]

_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*(?:[eE][-+]?\d+)?|nan|inf)")
_CELLS = re.compile(r"\s{2,}")


def snapshot_text(data: Any) -> str:
    """The text stored for ``data``: a ModelSummary, LayerSizes, ActivationStats, GradientStats
    or str.

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
    from pytest_modelhooks.shapes import LayerSizes
    from pytest_modelhooks.stats import ActivationStats, GradientStats
    from pytest_modelhooks.summary import ModelSummary

    if isinstance(data, ModelSummary):
        return str(data) + "\n"
    if isinstance(data, LayerSizes):
        return "Layer sizes\n" + str(data) + "\n"
    if isinstance(data, ActivationStats):
        return _stats_text(data)
    if isinstance(data, GradientStats):
        return _grads_text(data)
    if isinstance(data, str):
        return data if data.endswith("\n") else data + "\n"
    raise TypeError(
        "model_snapshot stores ModelSummary, LayerSizes, ActivationStats, GradientStats or str, "
        f"got {type(data).__name__}"
    )


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
    return f"Activation statistics (mean over {stats.num_batches} batches)\n" + _table(rows)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines) + "\n"


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
    return f"Gradient statistics (mean over {grads.num_steps} steps)\n" + _table(rows)


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
    from pytest_modelhooks.stats import ActivationStats, GradientStats

    rows: list[list[str]]
    names: list[str] = []
    if isinstance(data, ActivationStats):
        title = f"Statistics of every recorded layer over {_count(data.num_batches, 'batch')}"
        several = data.num_batches > 1
        legend = "means; min and max the extremes, nonfinite the total"
        rows = [["layer", "type", "mean", "std", "near_zero", "dead", "min", "max", "nonfinite"]]
        for layer in data:
            names.append(layer.name or "(model)")
            rows.append(
                [
                    names[-1],
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
    elif isinstance(data, GradientStats):
        title = f"Gradients of every tracked parameter over {_count(data.num_steps, 'step')}"
        several = data.num_steps > 1
        legend = "norm the mean; max_abs the largest, nonfinite the total"
        # whether each parameter changed while recording: the optimizer bugs' evidence
        updated = data.updated()
        rows = [["parameter", "shape", "norm", "max_abs", "nonfinite", "updated"]]
        for param in data:
            names.append(param.name)
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
    else:
        raise TypeError(f"context_text takes ActivationStats or GradientStats, got {type(data).__name__}")
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
    lines = _table(rows).splitlines()
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


# --------------------------------------------------------------------------- diffs


def _parse_number(text: str) -> float | None:
    match = _NUMBER.fullmatch(text.strip().rstrip(",;)").lstrip("("))
    if not match:
        return None
    try:
        return float(match.group(0).replace(",", ""))
    except ValueError:
        return None


def _rows(text: str) -> tuple[list[str], dict[str, dict[str, str]], dict[str, str]]:
    """Parse a snapshot text into (row order, {row label: {column: cell}}, {footer key: value})."""
    lines = text.splitlines()
    order: list[str] = []
    rows: dict[str, dict[str, str]] = {}
    footer: dict[str, str] = {}
    if lines and lines[0] == "Layer sizes":
        for line in lines[1:]:
            label, _, rest = line.partition(")")
            label = label.strip() + ")"
            order.append(label)
            rows[label] = {"output": " ".join(rest.split())}
        return order, rows, footer
    header: list[str] | None = None
    for line in lines:
        if header is None:
            if line.startswith(("Layer (type)", "layer  ", "parameter  ")):
                header = _CELLS.split(line.strip())
            continue
        if not line.strip() or set(line.strip()) <= {"=", "-"}:
            if rows:
                header = []  # the table ended: what follows is the footer
            continue
        if header == []:
            key, _, value = line.partition(":")
            footer[key.strip()] = value.strip()
            continue
        cells = _CELLS.split(line.strip())
        label = cells[0]
        order.append(label)
        rows[label] = dict(zip([name.lower() for name in header[1:]], cells[1:], strict=False))
    return order, rows, footer


def _delta(old: str, new: str) -> str:
    before, after = _parse_number(old), _parse_number(new)
    if before is None or after is None:
        return f"{old} -> {new}"
    change = after - before
    sign = "+" if change > 0 else "-"
    size = abs(change)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if size >= scale:
            return f"{sign}{size / scale:.2f} {unit}"
    return f"{sign}{size:g}"


def _column_name(column: str) -> str:
    return {
        "input shape": "input",
        "output shape": "output",
        "param #": "params",
        "trainable #": "trainable",
    }.get(column, column)


def describe_changes(old: str, new: str) -> list[str]:
    """What changed between two snapshot texts, one line per changed, added or removed layer,
    then the totals.

    >>> from torch import nn
    >>> from pytest_modelhooks import model_summary
    >>> old = snapshot_text(model_summary(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), (1, 4)))
    >>> new = snapshot_text(model_summary(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3)), (1, 4)))
    >>> for line in describe_changes(old, new)[1:3]:
    ...     print(line)
    ~ 1 (Linear): output (1, 2) -> (1, 3); params +9; mult-adds +8
    total params: 58 -> 67 (+9)
    """
    old_order, old_rows, old_footer = _rows(old)
    new_order, new_rows, new_footer = _rows(new)
    lines: list[str] = []
    for label in new_order:
        if label not in old_rows:
            cells = {_column_name(key): value for key, value in new_rows[label].items()}
            detail = ", ".join(
                f"{key} {value}" for key, value in cells.items() if key in ("output", "params")
            )
            lines.append(f"+ {label}: added" + (f" ({detail})" if detail else ""))
            continue
        changes = []
        for column, value in new_rows[label].items():
            before = old_rows[label].get(column)
            if before is None or before == value:
                continue
            name = _column_name(column)
            if name in ("params", "trainable", "mult-adds"):
                changes.append(f"{name} {_delta(before, value)}")
            else:
                changes.append(f"{name} {before} -> {value}")
        if changes:
            lines.append(f"~ {label}: " + "; ".join(changes))
    lines += [f"- {label}: removed" for label in old_order if label not in new_rows]
    for key in ("Total params", "Trainable params", "Mult-adds"):
        if key in old_footer and key in new_footer and old_footer[key] != new_footer[key]:
            before, after = old_footer[key].split(" (")[0], new_footer[key].split(" (")[0]
            lines.append(f"{key.lower()}: {before} -> {after} ({_delta(before, after)})")
    return lines


def _numbers_close(old: str, new: str, rtol: float, atol: float) -> bool:
    """Token by token (whitespace ignored): numbers within ``atol + rtol * |snapshot|`` (as
    numpy.isclose), everything else equal."""
    old_tokens, new_tokens = old.split(), new.split()
    if len(old_tokens) != len(new_tokens):
        return False
    for before, after in zip(old_tokens, new_tokens, strict=True):
        if before == after:
            continue
        a, b = _parse_number(before), _parse_number(after)
        if a is None or b is None or _NUMBER.sub("", before) != _NUMBER.sub("", after):
            return False
        if math.isnan(a) and math.isnan(b):
            continue
        if not abs(a - b) <= atol + rtol * abs(a):
            return False
    return True


class ModelSnapshotExtension(SingleFileSnapshotExtension):
    """A syrupy extension storing summaries, sizes and statistics as reviewable text files.

    >>> ModelSnapshotExtension.file_extension
    'txt'
    """

    file_extension = "txt"
    _write_mode = WriteMode.TEXT
    #: tolerances for numbers; the plugin sets them from ``modelhooks_snapshot_rtol``/``_atol``
    rtol: ClassVar[float] = 0.0
    atol: ClassVar[float] = 0.0

    def serialize(self, data: Any, **kwargs: Any) -> str:
        return snapshot_text(data)

    def matches(self, *, serialized_data: Any, snapshot_data: Any) -> bool:
        if serialized_data == snapshot_data:
            return True
        if (self.rtol <= 0 and self.atol <= 0) or not isinstance(serialized_data, str):
            return False
        return isinstance(snapshot_data, str) and _numbers_close(
            snapshot_data, serialized_data, self.rtol, self.atol
        )

    @classmethod
    def matches_test_location(cls, *, test_location: Any, snapshot_location: str) -> bool:
        """Also claim the file of a parametrized test whose id held characters a file name
        cannot (``conv/3x3``, ``a:b``): syrupy stores it without them (``conv3x3``), then
        fails to relate the file to its test and warns on every ``--snapshot-update``."""
        if super().matches_test_location(test_location=test_location, snapshot_location=snapshot_location):
            return True
        location = Path(snapshot_location)
        try:  # syrupy's own helpers, where this version has them
            if not test_location.is_item_parametrized or location.parent.name != test_location.basename:
                return False
            if not test_location.matches_snapshot_site(snapshot_location):
                return False
            sanitized = cls._sanitize_filename(test_location.snapshot_name_parametrized)
        except AttributeError:
            return False
        stem = location.name.removesuffix(f".{cls.file_extension}")
        # the test's own file, or one of its numbered ones (test[a].1.txt), never test[ab]
        return sanitized != test_location.snapshot_name_parametrized and (
            stem == sanitized or stem.startswith(f"{sanitized}.")
        )

    def diff_lines(self, serialized_data: Any, snapshot_data: Any) -> Iterator[str]:
        if snapshot_data == "":  # syrupy's stand-in for a snapshot not written yet
            yield "Write it with: pytest --snapshot-update (then review and commit the .txt file)"
            yield from super().diff_lines(serialized_data, snapshot_data)
            return
        changes = describe_changes(str(snapshot_data), str(serialized_data))
        if changes:
            yield "Changed layers (snapshot -> now):"
            for line in changes:
                yield "  " + line
            yield ""
        yield from super().diff_lines(serialized_data, snapshot_data)
