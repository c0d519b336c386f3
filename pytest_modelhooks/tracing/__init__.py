"""Tracing: running a model once on meta, fake or real tensors and recording every module call.

- :mod:`.records`: :class:`Call` and :class:`Trace`, what a trace records.
- :mod:`.engines`: :func:`trace_model` and the engines it tries in turn.
- :mod:`.dummy`: :func:`trace_dummy` and :func:`dummy_eval`, on a batch made for the model.
- :mod:`.recorder`: the global-hook recorder and its fast path through ``nn.Sequential``.
- :mod:`.dispatch`: the dispatch mode that builds meta outputs directly and counts flops.
- :mod:`.flops`: the flop formula registry.
- :mod:`.shortcuts`: stand-in forwards and shape rules for common leaf modules.
"""

from __future__ import annotations

from pytest_modelhooks.errors import LayerError
from pytest_modelhooks.tracing.dummy import dummy_eval, trace_dummy
from pytest_modelhooks.tracing.engines import Engine, gc_paused, trace_model
from pytest_modelhooks.tracing.records import Call, Trace

__all__ = ["Call", "Engine", "LayerError", "Trace", "dummy_eval", "gc_paused", "trace_dummy", "trace_model"]
