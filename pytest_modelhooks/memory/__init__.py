"""Will it fit: the memory of a training step, per layer, traced on fake tensors (no GPU, no
compute), and the largest batch that fits a budget."""

from __future__ import annotations

from pytest_modelhooks.memory.fit import BatchFit, max_batch_size
from pytest_modelhooks.memory.report import LayerMemory, MemoryReport
from pytest_modelhooks.memory.step import model_memory
from pytest_modelhooks.units import format_bytes, parse_bytes

__all__ = [
    "BatchFit",
    "LayerMemory",
    "MemoryReport",
    "format_bytes",
    "max_batch_size",
    "model_memory",
    "parse_bytes",
]
