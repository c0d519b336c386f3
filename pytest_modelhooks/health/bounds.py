"""The health bounds, defined once: each bound's name, what values it takes, how text becomes a
value, and where it is set (the argument of ``check()``, the ``modelhooks`` marker key, the ini
key, the CLI option). The library's ``check()``/``findings()``, the marker, the ini file, the
fixtures and ``modelhooks health`` all read this table, so a new bound is one row here plus its
rule in :mod:`pytest_modelhooks.health.rules`. No torch import: the plugin reads it at load.

>>> bound = BOUNDS["max_dead"]
>>> bound.ini, bound.option, bound.parse("0.3", "modelhooks_max_dead")
('modelhooks_max_dead', '--max-dead', 0.3)
>>> bound.validate(1.5)
Traceback (most recent call last):
...
ValueError: max_dead must be a fraction in [0, 1], got max_dead=1.5
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "ACTIVATION_BOUNDS",
    "BOUNDS",
    "GRADIENT_BOUNDS",
    "Bound",
    "check_order",
    "is_number",
]

Kind = Literal["range", "fraction", "growth", "norm"]

# what a value of each kind must be, as the library says it and as parsing text says it
_MUST = {
    "range": "must be a (low, high) pair with low <= high",
    "fraction": "must be a fraction in [0, 1]",
    "growth": "must be > 0",
    "norm": "must be a non-negative number (a gradient norm)",
}
_EXPECTED = {
    "range": "two numbers 'low,high'",
    "fraction": "a number in [0, 1]",
    "growth": "a positive number",
    "norm": "a positive number",
}


def is_number(value: object) -> bool:
    """A real number that bounds something: numpy scalars are real too; a bool is a user's slip
    (``max_norm=True``), and NaN bounds nothing.

    >>> is_number(0.5), is_number(True), is_number(float("nan"))
    (True, False, False)
    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)


@dataclass(frozen=True)
class Bound:
    """One health bound. ``name`` is the argument of ``check()``/``findings()``; ``setting`` the
    marker key and the plugin's setting (gradient bounds say ``grad`` there: one marker holds
    both kinds)."""

    name: str
    kind: Kind
    applies_to: Literal["activations", "gradients"]
    setting: str
    ini: str
    option: str
    help: str

    def valid(self, value: Any) -> bool:
        """Whether ``value`` (not None) is a value of this bound."""
        if self.kind == "range":
            return (
                isinstance(value, (tuple, list))
                and len(value) == 2
                and all(is_number(part) for part in value)
                and value[0] <= value[1]
                and value[0] >= 0
            )
        if not is_number(value):
            return False
        if self.kind == "fraction":
            return bool(0 <= value <= 1)
        if self.kind == "growth":
            return bool(value > 0)
        return bool(value >= 0)

    def validate(self, value: Any, name: str | None = None) -> None:
        """Raise ``ValueError`` naming the argument (``name``, default the bound's) unless
        ``value`` is None or valid."""
        if value is not None and not self.valid(value):
            name = name or self.name
            raise ValueError(f"{name} {_MUST[self.kind]}, got {name}={value!r}")

    def parse(self, text: Any, where: str) -> Any:
        """The value ``text`` stands for (a string from an ini file or a command line, or a
        marker's value), None when empty; ``ValueError`` naming ``where`` when it is none."""
        if text is None or text == "":
            return None
        try:
            if self.kind == "range":
                parts = text.split(",") if isinstance(text, str) else list(text)
                value: Any = tuple(float(part) for part in parts)
            else:
                if isinstance(text, bool):
                    raise ValueError(text)
                value = float(text)
        except (TypeError, ValueError):
            value = None
        if self.kind == "range" and isinstance(value, tuple) and len(value) == 2 and not self.valid(value):
            raise ValueError(f"{where}: need 0 <= low <= high, got {text!r}")
        if value is None or not self.valid(value):
            raise ValueError(f"{where}: expected {_EXPECTED[self.kind]}, got {text!r}")
        return value


#: Every bound, by the name ``check()`` takes it under, activations first.
BOUNDS: Mapping[str, Bound] = {
    bound.name: bound
    for bound in (
        Bound(
            "std",
            "range",
            "activations",
            "std",
            "modelhooks_std_range",
            "--std",
            "std bounds of every activation on every batch, as 'low,high'",
        ),
        Bound(
            "max_dead",
            "fraction",
            "activations",
            "max_dead",
            "modelhooks_max_dead",
            "--max-dead",
            "max fraction of a layer's channels never active over the recorded batches (0-1)",
        ),
        Bound(
            "max_near_zero",
            "fraction",
            "activations",
            "max_near_zero",
            "modelhooks_max_near_zero",
            "--max-near-zero",
            "max fraction of an activation's values near zero on any batch (0-1)",
        ),
        Bound(
            "max_std_growth",
            "growth",
            "activations",
            "max_std_growth",
            "modelhooks_max_std_growth",
            "--max-std-growth",
            "max std ratio of a layer over the layer before it",
        ),
        Bound(
            "max_norm",
            "norm",
            "gradients",
            "max_grad_norm",
            "modelhooks_max_grad_norm",
            "--max-grad-norm",
            "max gradient norm of each parameter on any step",
        ),
        Bound(
            "min_norm",
            "norm",
            "gradients",
            "min_grad_norm",
            "modelhooks_min_grad_norm",
            "--min-grad-norm",
            "min gradient norm of each parameter on any step",
        ),
    )
}
ACTIVATION_BOUNDS = tuple(bound for bound in BOUNDS.values() if bound.applies_to == "activations")
GRADIENT_BOUNDS = tuple(bound for bound in BOUNDS.values() if bound.applies_to == "gradients")


def check_order(low: Any, high: Any, low_name: str = "min_norm", high_name: str = "max_norm") -> None:
    """``ValueError`` when a lower bound is above its upper bound (both given).

    >>> check_order(2, 1)
    Traceback (most recent call last):
    ...
    ValueError: min_norm=2 is above max_norm=1
    """
    if low is not None and high is not None and low > high:
        raise ValueError(f"{low_name}={low!r} is above {high_name}={high!r}")
