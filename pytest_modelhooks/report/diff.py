"""What changed between two snapshot texts, layer by layer (``layer3 (Conv2d): output (1, 256, 14,
14) -> (1, 256, 7, 7); params +1.20 M``), and numbers compared within tolerances.
"""

from __future__ import annotations

import math
import re

from pytest_modelhooks.units import format_bytes

_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*(?:[eE][-+]?\d+)?|nan|inf)")


_CELLS = re.compile(r"\s{2,}")


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
            elif len(cells := _CELLS.split(line.strip())) == 3 and _parse_number(cells[1]) is not None:
                footer[f"{_PEAK}{cells[0]}"] = cells[1]  # a memory report's categories at the peak
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


_PEAK = "at the peak: "
_BYTES = ("saved", "largest temporary")


def _bytes_delta(old: str, new: str) -> str:
    before, after = _parse_number(old), _parse_number(new)
    if before is None or after is None:
        return f"{old} -> {new}"
    change = int(after - before)
    return ("+" if change > 0 else "") + format_bytes(change)


def _column_name(column: str) -> str:
    return {
        "input shape": "input",
        "output shape": "output",
        "param #": "params",
        "trainable #": "trainable",
    }.get(column, column)


def _with_trainable(old: dict[str, str], new: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """A summary shows its "Trainable #" column only when some layer holds frozen parameters:
    where one side has it and the other not, every parameter of the other side trains, so its
    trainable count is its parameter count (a stem frozen by accident shows at its layer)."""
    old, new = dict(old), dict(new)
    for one, other in ((old, new), (new, old)):
        if "trainable #" in other and "trainable #" not in one and "param #" in one:
            one["trainable #"] = one["param #"]
    return old, new


def describe_changes(old: str, new: str) -> list[str]:
    """What changed between two snapshot texts, one line per changed, added or removed layer,
    then the totals.

    >>> from pytest_modelhooks.report.text import snapshot_text
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
        old_cells, new_cells = _with_trainable(old_rows[label], new_rows[label])
        for column, value in new_cells.items():
            before = old_cells.get(column)
            if before is None or before == value:
                continue
            name = _column_name(column)
            if name in ("params", "trainable", "mult-adds"):
                changes.append(f"{name} {_delta(before, value)}")
            elif name in _BYTES:
                changes.append(f"{name} {_bytes_delta(before, value)}")
            else:
                changes.append(f"{name} {before} -> {value}")
        if changes:
            lines.append(f"~ {label}: " + "; ".join(changes))
    lines += [f"- {label}: removed" for label in old_order if label not in new_rows]
    for key in ("Total params", "Trainable params", "Mult-adds"):
        if key in old_footer and key in new_footer and old_footer[key] != new_footer[key]:
            before, after = old_footer[key].split(" (")[0], new_footer[key].split(" (")[0]
            lines.append(f"{key.lower()}: {before} -> {after} ({_delta(before, after)})")
    # a memory report: the peak first, then each category that changed
    keys = sorted(
        (key for key in new_footer if key.startswith(_PEAK)), key=lambda key: not key.endswith("total")
    )
    for key in keys:
        before, after = old_footer.get(key, "0"), new_footer[key]
        if before != after:
            what = "peak" if key.endswith("total") else key[len(_PEAK) :] + " at the peak"
            lines.append(f"{what}: {before} -> {after} bytes ({_bytes_delta(before, after)})")
    return lines


def numbers_close(old: str, new: str, rtol: float, atol: float) -> bool:
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
