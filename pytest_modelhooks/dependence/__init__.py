"""Dependence checks: what a model's output depends on, named at the layer.

- :mod:`.reach`: batch independence (:func:`batch_leaks`) and causality (:func:`causal_leaks`),
  found with gradients.
- :mod:`.determinism`: chance in eval mode (:func:`nondeterministic_layers`).
- :mod:`.calls`: the call log and the instrumented run both share.
"""

from __future__ import annotations

from pytest_modelhooks.dependence.determinism import check_deterministic, nondeterministic_layers
from pytest_modelhooks.dependence.reach import (
    batch_leaks,
    causal_leaks,
    check_batch_independence,
    check_causal,
)

__all__ = [
    "batch_leaks",
    "causal_leaks",
    "check_batch_independence",
    "check_causal",
    "check_deterministic",
    "nondeterministic_layers",
]
