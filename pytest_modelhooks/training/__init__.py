"""Does it learn: the loss at init, overfitting one batch, and an output that depends on every
input, each failure with its reason."""

from __future__ import annotations

from pytest_modelhooks.training.overfit import OverfitCurve, check_overfits
from pytest_modelhooks.training.sanity import check_loss_at_init, check_uses_input, input_use

__all__ = ["OverfitCurve", "check_loss_at_init", "check_overfits", "check_uses_input", "input_use"]
