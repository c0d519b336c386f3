"""Will it compile: graph breaks of ``torch.compile``, named at the module and the line."""

from __future__ import annotations

from pytest_modelhooks.compile.breaks import check_compiles, graph_breaks

__all__ = ["check_compiles", "graph_breaks"]
