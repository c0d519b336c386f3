"""Findings: what a check found, as data (:class:`Finding`), the error that carries them
(:class:`HealthError`), and the one aligned-table renderer every report uses. No torch import."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Finding", "HealthError", "format_findings", "format_number", "raise_for", "text_table"]


@dataclass(frozen=True)
class Finding:
    """One broken rule: which layer (or parameter), which statistic, what was seen, the bound,
    and the batch (or step) where it happened (the worst one).

    >>> print(Finding("encoder.1", "ReLU", "near_zero", 0.93, "<= 0.8", 2, "vanishing"))
    encoder.1 (ReLU): near_zero 0.93, bound <= 0.8 at batch 2 (vanishing)
    """

    layer: str
    layer_type: str
    statistic: str
    observed: float
    bound: str
    batch: int | None
    note: str = ""

    def __str__(self) -> str:
        where = "" if self.batch is None else f" at batch {self.batch}"
        note = f" ({self.note})" if self.note else ""
        observed = format_number(self.observed)
        return (
            f"{self.layer} ({self.layer_type}): {self.statistic} {observed}, bound {self.bound}{where}{note}"
        )


class HealthError(AssertionError):
    """A health check failed; ``.findings`` holds the data behind the message.

    >>> try:
    ...     raise_for([Finding("0", "Linear", "std", 40.0, "<= 10", 0)], "activation")
    ... except HealthError as error:
    ...     print(error.findings[0].statistic, error.findings[0].observed)
    std 40.0
    """

    def __init__(self, message: str, findings: Sequence[Finding]) -> None:
        super().__init__(message)
        self.findings = list(findings)


def format_number(value: float) -> str:
    """A finding's number as a table shows it: integers whole, others to 4 significant digits,
    ``-`` where no number applies.

    >>> format_number(40.0), format_number(0.123456), format_number(float("nan"))
    ('40', '0.1235', '-')
    """
    if math.isnan(value):
        return "-"  # no number applies (a parameter that did not change, a count not recorded)
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == int(value) and abs(value) < 1e9:
        return str(int(value))
    return f"{value:.4g}"


def format_findings(findings: Sequence[Finding], *, unit: str = "batch") -> str:
    """A plain-text table of findings, one row each, columns aligned; ``unit=""`` leaves out
    the column of where each happened (findings of no batch or step, such as a checkpoint's).

    >>> print(format_findings([Finding("0", "Linear", "std", 40.0, "<= 10", 3, "exploding")]))
    layer  type    statistic  observed  bound  batch  note
    0      Linear  std        40        <= 10  3      exploding
    """
    header = ["layer", "type", "statistic", "observed", "bound", unit, "note"]
    rows = [
        [
            f.layer or "(model)",
            f.layer_type,
            f.statistic,
            format_number(f.observed),
            f.bound,
            "" if f.batch is None else str(f.batch),
            f.note,
        ]
        for f in findings
    ]
    if not unit:
        return text_table([[cell for index, cell in enumerate(row) if index != 5] for row in [header, *rows]])
    return text_table([header, *rows])


def text_table(rows: Sequence[Sequence[str]], *, right_from: int | None = None) -> str:
    """Rows of cells as aligned columns (two spaces apart, no trailing spaces, no final newline):
    the one table renderer behind findings, snapshots, summaries and report sections. Columns
    from ``right_from`` on are right-aligned (numbers).

    >>> print(text_table([["layer", "std"], ["encoder.0", "0.5"]]))
    layer      std
    encoder.0  0.5
    >>> print(text_table([["layer", "params"], ["0", "1,024"]], right_from=1))
    layer  params
    0       1,024
    """
    if not rows:
        return ""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    first_right = len(widths) if right_from is None else right_from
    return "\n".join(
        "  ".join(
            cell.rjust(width) if column >= first_right else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    )


def raise_for(findings: Sequence[Finding], kind: str, *, unit: str | None = None) -> None:
    """Raise :class:`HealthError` with a table of ``findings``, if there are any. ``unit``
    heads the column of where each happened (default: "step" for gradients, else "batch").

    >>> raise_for([], "activation")  # nothing found: nothing raised
    >>> raise_for([Finding("0", "Linear", "std", 40.0, "<= 10", 3)], "activation")
    Traceback (most recent call last):
    ...
    pytest_modelhooks.findings.HealthError: activation health check failed: 1 finding(s) in 1 layer(s)
    layer  type    statistic  observed  bound  batch  note
    0      Linear  std        40        <= 10  3
    """
    __tracebackhide__ = True
    if not findings:
        return
    if unit is None:
        unit = "step" if kind == "gradient" else "batch"
    layers = len({finding.layer for finding in findings})
    message = (
        f"{kind} health check failed: {len(findings)} finding(s) in {layers} layer(s)\n"
        + format_findings(findings, unit=unit)
    )
    raise HealthError(message, findings)
