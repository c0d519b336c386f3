"""The text of a summary: deterministic, untruncated, the same on every device and run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pytest_modelhooks._tree import format_shape
from pytest_modelhooks.findings import text_table

if TYPE_CHECKING:
    from pytest_modelhooks.summary.records import LayerInfo, ModelSummary


def _human(number: float, units: Sequence[str], base: float) -> str:
    value, unit = float(number), 0
    while abs(value) >= base and unit < len(units) - 1:
        value /= base
        unit += 1
    return f"{int(value)} {units[0]}".strip() if unit == 0 else f"{value:.2f} {units[unit]}"


def _count_text(number: int) -> str:
    if number < 1000:
        return f"{number:,}"
    return f"{number:,} ({_human(number, ['', 'K', 'M', 'G', 'T'], 1000.0)})"


def _bytes_text(size: int) -> str:
    return _human(size, ["B", "KiB", "MiB", "GiB", "TiB"], 1024.0)


def _memory_text(memory: Sequence[tuple[str, int, int]]) -> str:
    if not memory:
        return "none"
    return "; ".join(
        f"{dtype} {_bytes_text(size)} ({count:,} element{'' if count == 1 else 's'})"
        for dtype, count, size in memory
    )


def render_text(summary: ModelSummary) -> str:
    """The summary as a plain-text table: no truncation, no addresses, no device names.

    >>> from torch import nn
    >>> from pytest_modelhooks import model_summary
    >>> text = render_text(model_summary(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), (1, 4)))
    >>> print(text.splitlines()[3])
    Layer (type)  Input shape  Output shape  Param #  Mult-adds
    """
    layers = summary.visible_layers
    show_trainable = any(layer.trainable_params != layer.params for layer in layers)
    show_mult_adds = summary.mult_adds is not None
    header = ["Layer (type)", "Input shape", "Output shape", "Param #"]
    if show_trainable:
        header.append("Trainable #")
    if show_mult_adds:
        header.append("Mult-adds")
    table = [header]
    for layer in layers:
        first = layer.call_number == 1
        row = [
            "  " * layer.depth + layer.title,
            format_shape(layer.input_shapes) if layer.ran or layer.calls else "-",
            format_shape(layer.output_shapes) if layer.ran else idle_text(layer),
            f"{layer.params:,}" if first else "-",
        ]
        if show_trainable:
            row.append(f"{layer.trainable_params:,}" if first else "-")
        if show_mult_adds:
            row.append(f"{layer.mult_adds:,}" if layer.mult_adds is not None else "-")
        table.append(row)
    lines = text_table(table, right_from=3).splitlines()  # the numbers right-aligned
    rule = "=" * len(lines[0])
    out = [rule, f"{summary.model_name}", rule, lines[0], "-" * len(rule), *lines[1:]]
    out.append(rule)
    out.append(f"Total params: {_count_text(summary.total_params)}")
    out.append(f"Trainable params: {_count_text(summary.trainable_params)}")
    out.append(f"Non-trainable params: {_count_text(summary.non_trainable_params)}")
    out.append(f"Parameter memory: {_memory_text(summary.param_memory)}")
    out.append(f"Buffer memory: {_memory_text(summary.buffer_memory)}")
    if summary.mult_adds is not None:
        out.append(f"Mult-adds: {_count_text(summary.mult_adds)}")
    out.append(f"Input: {format_shape(summary.input_shapes)}")
    out.append(f"Output: {format_shape(summary.output_shapes)}")
    if summary.depth is not None:
        out.append(f"Rows deeper than depth {summary.depth} folded into their parents.")
    out.append(rule)
    return "\n".join(out)


def idle_text(layer: LayerInfo) -> str:
    """What a row without an output shows in its output column."""
    if layer.container:
        return "container"
    return "never ran" if not layer.calls else "failed"
