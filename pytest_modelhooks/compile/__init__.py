"""Will it compile, will it export: graph breaks and recompilations of ``torch.compile``, and
``torch.export`` (or ONNX) failures and output mismatches, named at the module and the line."""

from __future__ import annotations

from pytest_modelhooks.compile.breaks import check_compiles, graph_breaks
from pytest_modelhooks.compile.export import check_exportable, export_problems
from pytest_modelhooks.compile.recompiles import recompiles

__all__ = ["check_compiles", "check_exportable", "export_problems", "graph_breaks", "recompiles"]
