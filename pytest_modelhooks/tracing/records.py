"""What a traced forward records: one :class:`Call` per module call, gathered in a
:class:`Trace`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(slots=True)
class Call:
    """One call of one module during a traced forward."""

    name: str
    module: nn.Module
    depth: int
    index: int  # the call's position among all calls (pre-order: a parent before its children)
    call_number: int  # 1 for the module's first call, 2 for its second, ...
    input_shapes: Any = None
    output_shapes: Any = None
    finished: bool = False
    flops: int = 0  # this call's flops, its children's included
    pending: Any = None  # the call's args while it runs (for the error if it fails)


@dataclass
class Trace:
    """The calls recorded by :func:`trace_model`, in execution order (a parent before its
    children), and the engine that produced them."""

    engine: str
    calls: list[Call] = field(default_factory=list)
    named: list[tuple[str, nn.Module]] = field(default_factory=list)  # model.named_modules()
    # every path to every module (named_modules(remove_duplicate=False)): a reused module's
    # second path too
    paths: list[tuple[str, nn.Module]] = field(default_factory=list)
    output_shapes: Any = None
    counted_flops: bool = False

    @property
    def total_flops(self) -> int | None:
        """Flops of the whole forward (None when not counted)."""
        if not self.counted_flops:
            return None
        return sum(call.flops for call in self.calls if call.depth == 0)
