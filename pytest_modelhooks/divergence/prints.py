"""Fingerprints: a few numbers per module call of a seeded run (the sum, norm and largest
absolute value of each output), as a snapshot stores them. A later change that alters a layer's
numbers is named at the first layer whose numbers moved while those before it did not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pytest_modelhooks._tree import tensor_leaves
from pytest_modelhooks.findings import Finding, text_table

__all__ = ["HEADER", "Fingerprints", "compare_prints", "fingerprints"]

HEADER = "Fingerprints"


@dataclass(frozen=True)
class Print:
    """One module call: its name and call number, type, and per output leaf (sum, norm, max |x|)."""

    name: str
    index: int
    type: str
    values: tuple[tuple[float, float, float], ...]

    @property
    def label(self) -> str:
        return (self.name or "(model)") + (f"#{self.index + 1}" if self.index else "")


def _numbers(output: Any) -> tuple[tuple[float, float, float], ...]:
    rows = []
    for _, tensor in tensor_leaves(output):
        if tensor.numel() == 0 or not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        values = tensor.detach().double()
        rows.append((float(values.sum()), float(torch.linalg.vector_norm(values)), float(values.abs().max())))
    return tuple(rows)


class Fingerprints:
    """The fingerprints of every module call of one run, in the order the calls start;
    ``str()`` is the table a snapshot stores, :meth:`from_text` reads it back."""

    def __init__(self, prints: list[Print]) -> None:
        self.prints = prints

    def __len__(self) -> int:
        return len(self.prints)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Fingerprints):
            return NotImplemented
        return self.prints == other.prints

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        model = next((one.type for one in self.prints if not one.name), None)
        return f"<Fingerprints of {model or 'a model'}: {len(self.prints)} calls>"

    def __str__(self) -> str:
        rows = [["layer", "type", "sum", "norm", "max"]]
        for one in self.prints:
            for part, (total, norm, top) in enumerate(one.values):
                label = one.label + (f"[{part}]" if part else "")
                rows.append([label, one.type, f"{total:.8g}", f"{norm:.8g}", f"{top:.8g}"])
        return f"{HEADER}: {len(self.prints)} calls\n" + text_table(rows)

    @classmethod
    def from_text(cls, text: str) -> Fingerprints:
        lines = text.strip("\n").splitlines()
        if not lines or not lines[0].startswith(HEADER + ":"):
            raise ValueError(f"not fingerprints: the text does not start with {HEADER!r}")
        prints: list[Print] = []
        for line in lines[2:]:
            label, kind, *numbers = line.split()
            values = (float(numbers[0]), float(numbers[1]), float(numbers[2]))
            base, _, part = label.partition("[")
            name, _, call = base.partition("#")
            name = "" if name == "(model)" else name
            index = int(call) - 1 if call else 0
            if part and prints and prints[-1].name == name and prints[-1].index == index:
                last = prints[-1]
                prints[-1] = Print(last.name, last.index, last.type, (*last.values, values))
            else:
                prints.append(Print(name, index, kind, (values,)))
        return cls(prints)


def fingerprints(model: nn.Module, *inputs: Any, seed: int = 0, **forward_kwargs: Any) -> Fingerprints:
    """The fingerprints of ``model(*inputs)``: eval mode, no grad, torch seeded with ``seed``
    (and put back), so that a test can pin a seeded model's per-layer numbers in a snapshot and
    :func:`~.first.first_divergence` ``(..., against=stored)`` names the layer a change moved.

    >>> torch.manual_seed(0) and None
    >>> print(fingerprints(nn.Sequential(nn.Linear(2, 2)), torch.ones(1, 2)))
    Fingerprints: 2 calls
    layer    type        sum          norm        max
    (model)  Sequential  -0.81106868  0.91839881  0.91275233
    0        Linear      -0.81106868  0.91839881  0.91275233
    """
    from pytest_modelhooks.divergence.calls import record_calls
    from pytest_modelhooks.hooks.state import preserve_training_flags
    from pytest_modelhooks.inputs import check_model, with_forward_kwargs
    from pytest_modelhooks.tracing.state import buffers_kept, rng_kept

    model = check_model(model)
    args, kwargs = with_forward_kwargs(model, tuple(inputs), {}, forward_kwargs, "fingerprints")
    eval_mode = preserve_training_flags(model, eval_mode=True)
    with rng_kept(model, seed), eval_mode, buffers_kept(model):
        calls = record_calls(model, args, kwargs)
    return Fingerprints(
        [Print(call.name, call.index, type(call.module).__name__, _numbers(call.output)) for call in calls]
    )


def _moved(stored: Print, now: tuple[tuple[float, float, float], ...], rtol: float) -> float:
    """The largest relative change of a call's numbers (inf: another number of outputs)."""
    if len(stored.values) != len(now):
        return math.inf
    worst = 0.0
    for old, new in zip(stored.values, now, strict=True):
        scale = max(abs(old[1]), 1e-12) * 1.0  # the norm: a sum near zero moves at the norm's scale
        for a, b in zip(old, new, strict=True):
            if math.isnan(a) and math.isnan(b):
                continue
            worst = max(worst, abs(a - b) / scale if math.isfinite(b) else math.inf)
    return worst


def compare_prints(
    model: nn.Module, calls: list[Any], stored: Fingerprints, rtol: float | None, atol: float | None
) -> list[Finding]:
    """The first call, in the order calls return (the innermost first), whose numbers moved
    beyond ``rtol`` (default 1e-5, relative to the output's norm), or the first call the stored
    run did not have."""
    relative = 1e-5 if rtol is None else rtol
    by_key = {(one.name, one.index): one for one in stored.prints}
    for call in sorted(calls, key=lambda call: call.finished):  # the innermost first
        old = by_key.get((call.name, call.index))
        kind = type(call.module).__name__
        if old is None:
            note = "a call the stored fingerprints do not have (the model's structure changed)"
            return [Finding(call.name, kind, "new call", math.nan, "stored", None, note)]
        moved = _moved(old, _numbers(call.output), relative)
        if moved > relative:
            note = (
                f"against the stored fingerprints: its numbers moved by {moved:.3g} of the output's norm, "
                "and every call that returned before it agrees"
            )
            return [Finding(call.name, kind, "diverges", moved, f"<= {relative:g}", None, note)]
    return []
