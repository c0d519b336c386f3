"""What a traced step's memory report holds and how it prints: the peak, what is alive at it by
category, and one row per module call with what it saved for backward."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from pytest_modelhooks.findings import Finding, HealthError, text_table
from pytest_modelhooks.memory.tracker import Storage, Tracker
from pytest_modelhooks.units import format_bytes, parse_bytes

#: the categories of what is alive at the peak, in the order a report lists them
CATEGORIES = ("parameter", "buffer", "gradient", "optimizer", "saved", "input", "other")

_LABELS = {
    "parameter": "parameters",
    "buffer": "buffers",
    "gradient": "gradients",
    "optimizer": "optimizer state",
    "saved": "saved for backward",
    "input": "inputs",
    "other": "other (temporaries, outputs)",
}


@dataclass(frozen=True)
class LayerMemory:
    """One module call of the measured forward: what autograd saved for backward among the
    tensors it made (the innermost module running when each was allocated; each storage once),
    and the largest tensor it made and freed before returning."""

    name: str
    type: str
    depth: int
    saved_bytes: int
    temporary_bytes: int


@dataclass
class MemoryReport:
    """One step's memory, from :func:`pytest_modelhooks.memory.model_memory`.

    ``peak_bytes`` is the most alive at once, ``peak_phase`` when ("forward", "backward" or
    "step"), and ``parameter_bytes`` ... ``other_bytes`` what was alive at that moment, by
    category (they sum to the peak). ``saved_bytes`` is what autograd keeps for backward that
    is no parameter or buffer (the input batch when it is saved), each storage once;
    ``saved_total_bytes`` the same over the whole step (what the forward leaves for backward,
    the figure activation checkpointing reduces).
    ``layers`` has one :class:`LayerMemory` per module call. ``rounding`` is the allocation
    granularity applied (1: exact sizes; 512: the CUDA caching allocator's blocks).
    """

    model: str
    mode: str
    optimizer: str | None
    device: str
    rounding: int
    inputs: list[tuple[tuple[int, ...], str]]
    autocast: str | None
    peak_bytes: int
    peak_phase: str
    parameter_bytes: int
    buffer_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    saved_bytes: int
    input_bytes: int
    other_bytes: int
    saved_total_bytes: int = 0  # everything autograd saved in the step, alive at once or not
    layers: list[LayerMemory] = field(default_factory=list)
    holders: list[tuple[str, int]] = field(default_factory=list)  # saved bytes alive at the peak, by layer

    def __iter__(self) -> Iterator[LayerMemory]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerMemory:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no module call named {name!r} in the report (names: {self._some_names()})")

    def _some_names(self) -> str:
        names = [layer.name for layer in self.layers if layer.name]
        return ", ".join(map(repr, names[:8])) + (", ..." if len(names) > 8 else "")

    def by_category(self) -> dict[str, int]:
        """What is alive at the peak, by category (the values sum to ``peak_bytes``)."""
        return {category: getattr(self, f"{category}_bytes") for category in CATEGORIES}

    def headline(self) -> str:
        what = {"train": "training step", "eval": "eval forward"}[self.mode]
        if self.mode == "train" and self.optimizer is None:
            what = "forward and backward"
        optimizer = f", {self.optimizer}" if self.optimizer else ""
        cast = f", autocast {self.autocast}" if self.autocast else ""
        shapes = ", ".join(f"{'x'.join(map(str, shape))} {dtype}" for shape, dtype in self.inputs)
        peak = f"peak {format_bytes(self.peak_bytes)} in {self.peak_phase}"
        return f"{self.model} {what}{optimizer}{cast}, input {shapes}: {peak}"

    def __str__(self) -> str:
        """Deterministic: the same model and options print the same text on every run."""
        rounding = (
            "exact sizes" if self.rounding == 1 else f"{self.rounding}-byte blocks, as the CUDA allocator"
        )
        lines = [self.headline(), f"sizes: {rounding} ({self.device})", ""]
        rows = [["at the peak", "bytes", "size"]]
        rows += [
            [_LABELS[category], f"{value:,}", format_bytes(value)]
            for category, value in self.by_category().items()
            if value
        ]
        rows.append(["total", f"{self.peak_bytes:,}", format_bytes(self.peak_bytes)])
        lines += [text_table(rows, right_from=1)]
        lines += [f"saved for backward by the forward: {self.saved_total_bytes:,} bytes", ""]
        table = [["layer", "type", "saved", "largest temporary"]]
        for layer in self.layers:
            table.append(
                [
                    "  " * max(layer.depth - 1, 0) + (layer.name or "(model)"),
                    layer.type,
                    f"{layer.saved_bytes:,}",
                    f"{layer.temporary_bytes:,}",
                ]
            )
        lines.append(text_table(table, right_from=2))
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field, byte counts as integers."""
        data = asdict(self)
        data["inputs"] = [{"shape": list(shape), "dtype": dtype} for shape, dtype in self.inputs]
        data["holders"] = [{"layer": name, "saved_bytes": count} for name, count in self.holders]
        return data

    def to_markdown(self) -> str:
        """The category table and the layers as Markdown (for a PR comment or a CI summary)."""
        lines = [f"**{self.headline()}**", "", "| at the peak | bytes | size |", "|---|---:|---:|"]
        for category, value in self.by_category().items():
            if value:
                lines.append(f"| {_LABELS[category]} | {value:,} | {format_bytes(value)} |")
        lines += [f"| **total** | **{self.peak_bytes:,}** | **{format_bytes(self.peak_bytes)}** |", ""]
        lines += ["| layer | type | saved | largest temporary |", "|---|---|---:|---:|"]
        for layer in self.layers:
            name = layer.name or "(model)"
            lines.append(f"| `{name}` | {layer.type} | {layer.saved_bytes:,} | {layer.temporary_bytes:,} |")
        return "\n".join(lines) + "\n"

    def findings(self, *, max_peak: object) -> list[Finding]:
        """The peak over ``max_peak`` (bytes, or a size such as ``"24GiB"``) as a finding
        naming the phase and the layers whose saved tensors are alive at the peak."""
        budget = parse_bytes(max_peak, "max_peak")
        if self.peak_bytes <= budget:
            return []
        top = ", ".join(f"{name or '(model)'} {format_bytes(count)}" for name, count in self.holders[:5])
        parts = [f"in {self.peak_phase}"]
        parts += [f"{_LABELS[c]} {format_bytes(v)}" for c, v in self.by_category().items() if v]
        note = "; ".join(parts) + (f"; saved by: {top}" if top else "")
        return [Finding("", self.model, "peak bytes", float(self.peak_bytes), f"<= {budget:,}", None, note)]

    def check(self, *, max_peak: object) -> None:
        """Raise :class:`HealthError` when the peak is over ``max_peak`` (``"24GiB"``, ``80e9``)."""
        __tracebackhide__ = True
        found = self.findings(max_peak=max_peak)
        if found:
            budget = parse_bytes(max_peak, "max_peak")
            message = (
                f"memory check failed: {self.headline()}, over the budget of {format_bytes(budget)} "
                f"({budget:,} bytes) by {format_bytes(self.peak_bytes - budget)}\n  {found[0].note}"
            )
            raise HealthError(message, found)


def _category(storage: Storage, moment: int) -> str:
    if storage.role in ("parameter", "buffer", "gradient", "optimizer"):
        return storage.role
    if storage.saved_at_moment(moment):
        return "saved"
    return storage.role or "other"


def build_report(
    tracker: Tracker,
    *,
    model: str,
    mode: str,
    optimizer: str | None,
    device: torch.device,
    inputs: list[tuple[tuple[int, ...], str]],
    autocast: torch.dtype | None,
) -> MemoryReport:
    at_peak = tracker.live_at(tracker.peak_at)
    totals = dict.fromkeys(CATEGORIES, 0)
    for storage in at_peak:
        totals[_category(storage, tracker.peak_at)] += storage.nbytes
    calls = tracker.calls
    saved = [0] * len(calls)
    temporary = [0] * len(calls)
    for storage in tracker.storages:
        if storage.step != tracker.step or storage.call < 0 or storage.phase != "forward":
            continue
        call = calls[storage.call]
        if storage.saved and storage.role not in ("parameter", "buffer"):
            saved[storage.call] += storage.nbytes
        elif storage.died is not None and storage.died <= call.end:
            temporary[storage.call] = max(temporary[storage.call], storage.nbytes)
    saved_total = sum(
        storage.nbytes for storage in tracker.storages if storage.saved and storage.saved_step == tracker.step
    )
    holders: dict[str, int] = {}
    for storage in at_peak:
        if (
            _category(storage, tracker.peak_at) == "saved"
            and storage.call >= 0
            and storage.step == tracker.step
        ):
            name = calls[storage.call].name
            holders[name] = holders.get(name, 0) + storage.nbytes
    return MemoryReport(
        model=model,
        mode=mode,
        optimizer=optimizer,
        device=device.type,
        rounding=tracker.block,
        inputs=inputs,
        autocast=str(autocast).replace("torch.", "") if autocast is not None else None,
        peak_bytes=tracker.peak_bytes,
        peak_phase=tracker.peak_phase,
        **{f"{category}_bytes": totals[category] for category in CATEGORIES},
        saved_total_bytes=saved_total,
        layers=[
            LayerMemory(call.name, call.type, call.depth, saved[index], temporary[index])
            for index, call in enumerate(calls)
        ],
        holders=sorted(holders.items(), key=lambda item: (-item[1], item[0])),
    )
