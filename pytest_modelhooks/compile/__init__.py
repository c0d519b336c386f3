"""Will it compile: graph breaks and recompilations of ``torch.compile``, named at the module
and the line."""

from __future__ import annotations

from pytest_modelhooks.compile.breaks import check_compiles, graph_breaks
from pytest_modelhooks.compile.recompiles import recompiles

__all__ = ["check_compiles", "graph_breaks", "recompiles"]
