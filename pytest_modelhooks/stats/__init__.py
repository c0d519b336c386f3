"""Activation and gradient statistics, computed where the tensors live.

:class:`ActivationStats` records, for every hooked module and every recorded forward ("batch"),
the mean, std, fraction of values near zero, count of non-finite values, min and max of each
floating-point tensor the module returns, plus per-layer dead units and optional histograms.
:class:`GradientStats` does the same for parameter gradients after each backward.

Speed rules (figures in ``docs/performance.md``):

* On CUDA and other accelerators nothing is read back while recording, and a step is bound by
  kernel launches: a batch's outputs are held to its end and those of one shape reduced
  together (a backward's gradients at its end), so the kernels grow with the distinct shapes,
  not the modules; the numbers cross to the host once, when read.
* On the CPU the device *is* the host, so reading a scalar costs ~1 us and no synchronisation;
  it is used to run the exact two-pass std only where the one-pass formula would lose
  precision (a large mean over a small spread), and to count non-finite values only when the
  sums say there are any.
* No activation is kept past its batch (at most ``max_held`` bytes within one): memory is
  O(series x batches) numbers.

- :mod:`.records`: the frozen records (:class:`LayerStats`, :class:`ParamGradStats`).
- :mod:`.host`: the CPU's exact reductions, large tensors piece by piece through the cache.
- :mod:`.reduce`: the device's reduction kernels (one tensor, stacked rows, fused).
- :mod:`.held`: the outputs held to the batch's end, and their reduction together.
- :mod:`.dead`: the running channel maxima behind dead units, and what is rectified.
- :mod:`.activations`, :mod:`.gradients`: the two recorders.
"""

from __future__ import annotations

from pytest_modelhooks.stats.activations import ActivationStats
from pytest_modelhooks.stats.gradients import GradientStats
from pytest_modelhooks.stats.records import STATISTICS, LayerStats, ParamGradStats, SteppedOptimizer

__all__ = [
    "STATISTICS",
    "ActivationStats",
    "GradientStats",
    "LayerStats",
    "ParamGradStats",
    "SteppedOptimizer",
]
