"""Where two runs part: the first module whose output differs while its inputs agree, against
autocast, channels_last, CUDA, the compiled model, a refactor, or stored fingerprints."""

from __future__ import annotations

from pytest_modelhooks.divergence.first import check_same, first_divergence
from pytest_modelhooks.divergence.prints import Fingerprints, fingerprints

__all__ = ["Fingerprints", "check_same", "fingerprints", "first_divergence"]
