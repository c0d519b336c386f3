"""The records of a summary: one :class:`LayerInfo` per module call and the
:class:`ModelSummary` holding them, raw values only; text comes from :mod:`.render`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pytest_modelhooks._tree import format_shape, jsonable_shape
from pytest_modelhooks.summary.render import idle_text, render_text


@dataclass(frozen=True)
class LayerInfo:
    """One row of a summary: one call of one module (or a module that never ran).

    ``params``/``trainable_params`` count the module's parameters recursively, each tensor
    once; ``own_params`` counts only those registered on the module itself. ``mult_adds`` is
    this call's multiply-add count (its children's included), from torch's flop formulas.

    >>> from torch import nn
    >>> from pytest_modelhooks import model_summary
    >>> row = model_summary(nn.Sequential(nn.Linear(4, 8)), (1, 4))["0"]
    >>> row.type, row.output_shapes, row.params, row.mult_adds
    ('Linear', torch.Size([1, 8]), 40, 32)
    """

    name: str
    type: str
    depth: int
    call_number: int = 1
    calls: int = 1
    input_shapes: Any = None
    output_shapes: Any = None
    params: int = 0
    own_params: int = 0
    trainable_params: int = 0
    mult_adds: int | None = None
    ran: bool = True
    #: a ModuleList/ModuleDict: it holds the rows below it but is never called itself
    container: bool = False

    @classmethod
    def _of(cls, fields: dict[str, Any]) -> LayerInfo:
        # Every field given, none validated: the frozen __init__ sets each field through
        # object.__setattr__, which costs ~40 ms on a 20,000-row summary.
        row = object.__new__(cls)
        object.__setattr__(row, "__dict__", fields)  # the dict itself, not a copy
        return row

    @property
    def label(self) -> str:
        """The qualified name (the model's class name for the root), with the call number for
        second and later calls."""
        base = self.name or self.type
        return base if self.call_number == 1 else f"{base} [call {self.call_number}]"

    @property
    def title(self) -> str:
        """``label (Type)``; the model's own row is just its class name."""
        return self.label if not self.name else f"{self.label} ({self.type})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form of the row."""
        return {
            "name": self.name,
            "type": self.type,
            "depth": self.depth,
            "call_number": self.call_number,
            "calls": self.calls,
            "input_shapes": jsonable_shape(self.input_shapes),
            "output_shapes": jsonable_shape(self.output_shapes),
            "params": self.params,
            "own_params": self.own_params,
            "trainable_params": self.trainable_params,
            "mult_adds": self.mult_adds,
            "ran": self.ran,
            "container": self.container,
        }


@dataclass(frozen=True)
class ModelSummary:
    """A model's layers, shapes, parameter totals, memory and multiply-adds.

    ``str(summary)`` is a table that never truncates a cell and is identical across runs and
    devices; ``summary.to_dict()`` is JSON-ready. ``total_params`` always equals
    ``sum(p.numel() for p in model.parameters())``.

    >>> from torch import nn
    >>> from pytest_modelhooks import model_summary
    >>> summary = model_summary(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), (1, 4))
    >>> summary.total_params, summary.mult_adds, [layer.name for layer in summary.layers]
    (40, 32, ['', '0', '1'])
    """

    model_name: str
    layers: tuple[LayerInfo, ...]
    input_shapes: Any
    output_shapes: Any
    total_params: int
    trainable_params: int
    param_memory: tuple[tuple[str, int, int], ...]  # (dtype, elements, bytes)
    buffer_memory: tuple[tuple[str, int, int], ...]
    mult_adds: int | None
    depth: int | None = None
    engine: str = field(default="meta", compare=False)

    @property
    def non_trainable_params(self) -> int:
        """Parameters with ``requires_grad=False``."""
        return self.total_params - self.trainable_params

    @property
    def param_bytes(self) -> int:
        """Bytes held by the parameters (each tensor once)."""
        return sum(size for _, _, size in self.param_memory)

    @property
    def buffer_bytes(self) -> int:
        """Bytes held by the buffers (each tensor once)."""
        return sum(size for _, _, size in self.buffer_memory)

    @property
    def visible_layers(self) -> tuple[LayerInfo, ...]:
        """The rows shown for ``depth`` (all rows when ``depth`` is None)."""
        if self.depth is None:
            return self.layers
        return tuple(layer for layer in self.layers if layer.depth <= self.depth)

    def __getitem__(self, name: str) -> LayerInfo:
        """The first call's row of the module called ``name`` (``""`` is the model), or a later
        call's row by its label (``"block [call 2]"``)."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        for layer in self.layers:
            if layer.call_number > 1 and layer.label == name:
                return layer
        raise KeyError(f"{name!r} is not a module of {self.model_name}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: totals, memory by dtype and every row."""
        return {
            "model": self.model_name,
            "input_shapes": jsonable_shape(self.input_shapes),
            "output_shapes": jsonable_shape(self.output_shapes),
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "non_trainable_params": self.non_trainable_params,
            "param_memory": {
                dtype: {"elements": count, "bytes": size} for dtype, count, size in self.param_memory
            },
            "buffer_memory": {
                dtype: {"elements": count, "bytes": size} for dtype, count, size in self.buffer_memory
            },
            "mult_adds": self.mult_adds,
            "depth": self.depth,
            "layers": [layer.to_dict() for layer in self.visible_layers],
        }

    def to_markdown(self) -> str:
        """The rows and totals as a GitHub-flavoured Markdown table: for a pull request
        comment, or a CI job's summary (``$GITHUB_STEP_SUMMARY``). A module that never ran
        says so in its output cell.

        >>> from torch import nn
        >>> from pytest_modelhooks import model_summary
        >>> summary = model_summary(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), (1, 4))
        >>> print(summary.to_markdown())
        ### Sequential
        <BLANKLINE>
        | layer | type | input | output | params | mult-adds |
        |---|---|---|---|---:|---:|
        | `Sequential` | Sequential | (1, 4) | (1, 8) | 40 | 32 |
        | `0` | Linear | (1, 4) | (1, 8) | 40 | 32 |
        | `1` | ReLU | (1, 8) | (1, 8) | 0 | 0 |
        <BLANKLINE>
        Total params: 40 (trainable 40)
        Mult-adds: 32
        """
        lines = [
            f"### {self.model_name}",
            "",
            "| layer | type | input | output | params | mult-adds |",
            "|---|---|---|---|---:|---:|",
        ]
        for layer in self.visible_layers:
            output = format_shape(layer.output_shapes) if layer.ran else idle_text(layer)
            mult_adds = "" if layer.mult_adds is None else f"{layer.mult_adds:,}"
            cells = [f"`{layer.label}`", layer.type, format_shape(layer.input_shapes), output]
            # a ModuleDict key may hold a "|", which would split the cell
            cells = [cell.replace("|", "\\|") for cell in cells]
            lines.append(f"| {' | '.join(cells)} | {layer.params:,} | {mult_adds} |")
        lines += ["", f"Total params: {self.total_params:,} (trainable {self.trainable_params:,})"]
        if self.mult_adds is not None:
            lines.append(f"Mult-adds: {self.mult_adds:,}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return render_text(self)
