"""Model summaries: a record per module call, exact parameter totals, deterministic text.

The records (:mod:`.records`: :class:`LayerInfo`, :class:`ModelSummary`) hold raw values;
:mod:`.build` makes them from a traced forward; all text comes from :mod:`.render`, so snapshot
text never depends on the device, on object addresses or on timings.
"""

from __future__ import annotations

from pytest_modelhooks.summary.build import model_summary
from pytest_modelhooks.summary.records import LayerInfo, ModelSummary
from pytest_modelhooks.summary.render import render_text

__all__ = ["LayerInfo", "ModelSummary", "model_summary", "render_text"]
