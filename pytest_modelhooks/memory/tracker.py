"""Which tensor storages are alive at each moment of a training step, who made them and whether
autograd saved them: a dispatch mode that sees every allocation (on fake, meta or real tensors
alike), module hooks that say which module call is running, and ``saved_tensors_hooks`` that
see what autograd keeps for backward.

A storage is what an allocator hands out: views and in-place results share their base's, so
each is counted once. One is alive until its last tensor is gone; liveness is read from a weak
reference to the C++ storage after every operation, and the peak is the largest sum of live
storages seen after an operation's outputs exist (its inputs are still referenced then, as they
are on a GPU when the kernel runs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pytest_modelhooks._torch import TorchDispatchMode, storage_expired, storage_ref
from pytest_modelhooks._tree import tensor_leaves
from pytest_modelhooks.units import rounded

PHASES = ("setup", "forward", "backward", "step")
PINNED = ("parameter", "buffer", "input")


@dataclass(eq=False)
class Storage:
    """One allocation: its size as allocated, when it was made and freed (operation counts),
    the module call and phase that made it, and what it turned out to be."""

    serial: int
    nbytes: int
    born: int
    phase: str
    call: int  # index into Tracker.calls; -1 outside every module
    ref: Any = field(repr=False)
    died: int | None = None
    role: str = ""  # "parameter", "buffer", "input", "gradient", "optimizer"; "" until known
    saved: bool = False  # autograd saved it for backward (and it is no parameter or buffer)
    saved_at: int | None = None  # when autograd first saved it
    step: int = 0  # the step that made it (0: set-up and warm-up; the measured one is later)
    saved_step: int | None = None  # the step whose autograd saved it
    released: int | None = None  # when the backward that used it ended (the graph was freed)

    def saved_at_moment(self, moment: int) -> bool:
        """Whether autograd held it for backward right after operation ``moment``."""
        return (
            self.saved
            and self.saved_at is not None
            and self.saved_at <= moment
            and (self.released is None or self.released > moment)
        )


@dataclass
class CallRecord:
    """One module call in the forward: where it starts and ends in the operation count."""

    name: str  # qualified, "[call N]" for a module run more than once
    type: str
    depth: int
    start: int
    end: int = -1


class Tracker(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """The live storages of a step; ``phase`` is set by the caller as the step goes on. ``run``
    runs each operation (``func(*args, **kwargs)`` if not given; on fake tensors, one that
    allocates as the real kernels do)."""

    def __init__(
        self, block: int = 1, run: Callable[[Any, tuple[Any, ...], dict[str, Any]], Any] | None = None
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.block = block
        self.run = run
        self.clock = 0
        self.phase = "setup"
        self.storages: list[Storage] = []
        self._live: dict[int, Storage] = {}  # by the C++ storage's address, while it lives
        self._pinned: dict[int, Storage] = {}  # the same, for storages the caller holds
        self.live_bytes = 0
        self.peak_bytes = 0
        self.peak_at = 0
        self.peak_phase = "setup"
        self.calls: list[CallRecord] = []
        self._stack: list[int] = []
        self.measuring = True  # False: storages are tracked, the peak is not taken (a warm-up step)
        self.step = 0  # which step runs: 0 until the measured one begins

    def begin_measured(self) -> None:
        """From now on the peak is taken, and module calls are those of the measured step."""
        self.measuring = True
        self.step += 1
        self.calls.clear()

    def unwind(self) -> CallRecord | None:
        """After a forward failed: the innermost module call that was running (where it
        failed), and no call running any more."""
        failed = self.calls[self._stack[-1]] if self._stack else None
        self._stack.clear()
        return failed

    # -- storages

    def track(self, tensor: torch.Tensor, role: str = "") -> Storage | None:
        """The storage of ``tensor``, tracked from now on if it was not yet."""
        if tensor.layout != torch.strided or type(tensor).__name__ == "FunctionalTensor":
            return None
        try:
            ref = storage_ref(tensor)
        except (RuntimeError, NotImplementedError):  # a tensor subclass without a storage
            return None
        known = self._live.get(ref.cdata) or self._pinned.get(ref.cdata)
        if known is not None:
            if not known.ref.expired():
                if role and not known.role:
                    known.role = role
                return known
            # freed since the last sweep, and its address already reused: count it gone first
            known.died = self.clock
            self.live_bytes -= known.nbytes
            self._live.pop(ref.cdata, None)
            self._pinned.pop(ref.cdata, None)
        nbytes = rounded(tensor.untyped_storage().nbytes(), self.block)
        call = self._stack[-1] if self._stack else -1
        storage = Storage(
            len(self.storages), nbytes, self.clock, self.phase, call, ref, role=role, step=self.step
        )
        self.storages.append(storage)
        # parameters, buffers and inputs are held by the caller all step long: no need to look
        # at them after every operation (on a 7B model, most of the storages)
        (self._pinned if role in PINNED else self._live)[ref.cdata] = storage
        self.live_bytes += nbytes
        return storage

    def pin(self, storage: Storage) -> None:
        """``storage`` stays alive until the caller lets it go (an optimizer's state)."""
        if self._live.pop(storage.ref.cdata, None) is storage:
            self._pinned[storage.ref.cdata] = storage

    def sweep(self) -> None:
        """Mark the storages freed since the last look (the pinned ones are held)."""
        expired = storage_expired
        gone = [key for key in self._live if expired(key)]
        for key in gone:
            storage = self._live.pop(key)
            storage.died = self.clock
            self.live_bytes -= storage.nbytes

    def sweep_between(self) -> None:
        """A sweep between two operations (a module returned, the step ended): a moment of its
        own, so what it finds freed was still alive right after the operation before, where
        the peak may have been taken."""
        self.clock += 1
        self.sweep()

    def _sample(self) -> None:
        if self.measuring and self.live_bytes > self.peak_bytes:
            self.peak_bytes, self.peak_at, self.peak_phase = self.live_bytes, self.clock, self.phase

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.clock += 1
        self.sweep()  # what the caller dropped before this operation is gone before it allocates
        out = func(*args, **(kwargs or {})) if self.run is None else self.run(func, args, kwargs or {})
        for _, tensor in tensor_leaves(out):
            self.track(tensor)
        self._sample()
        return out

    def backward_done(self) -> None:
        """The backward freed its graph: what it saved is no longer held for it."""
        for storage in (*self._live.values(), *self._pinned.values()):
            if storage.saved and storage.released is None:
                storage.released = self.clock

    def live_at(self, moment: int) -> list[Storage]:
        """The storages alive right after operation ``moment``."""
        return [s for s in self.storages if s.born <= moment and (s.died is None or s.died > moment)]

    # -- module calls

    @contextmanager
    def calls_recorded(self, named: Sequence[tuple[str, nn.Module]]) -> Iterator[None]:
        """Forward hooks on every module for the block: which call is running."""
        seen: dict[int, int] = {}
        handles = []

        def pre(name: str, depth: int) -> Any:
            def hook(module: nn.Module, args: Any) -> None:
                if self.phase != "forward":  # recomputation of a checkpoint runs in backward
                    return
                count = seen[id(module)] = seen.get(id(module), 0) + 1
                label = name if count == 1 else f"{name} [call {count}]"
                self._stack.append(len(self.calls))
                self.calls.append(CallRecord(label, type(module).__name__, depth, self.clock))

            return hook

        def post(module: nn.Module, args: Any, output: Any) -> None:
            if self.phase != "forward" or not self._stack:
                return
            self.sweep_between()  # what the call freed before returning is its temporaries
            self.calls[self._stack.pop()].end = self.clock

        try:
            for name, module in named:
                depth = name.count(".") + 1 if name else 0
                handles.append(module.register_forward_pre_hook(pre(name, depth)))
                handles.append(module.register_forward_hook(post))
            yield
        finally:
            for handle in handles:
                handle.remove()

    # -- what autograd saves

    @contextmanager
    def saves_seen(self) -> Iterator[None]:
        """``saved_tensors_hooks`` for the block: every tensor autograd saves for backward
        marks its storage as saved (parameters and buffers excepted: they are counted as
        what they are)."""

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = self.track(tensor)
            if storage is not None and storage.role not in ("parameter", "buffer") and not storage.saved:
                storage.saved, storage.saved_at, storage.saved_step = True, self.clock, self.step
            return tensor

        def unpack(tensor: torch.Tensor) -> torch.Tensor:
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield


@contextmanager
def tracking(tracker: Tracker, named: Sequence[tuple[str, nn.Module]]) -> Iterator[Tracker]:
    """The tracker on for the block: its dispatch mode, the module hooks, the save hooks."""
    with ExitStack() as stack:
        stack.enter_context(tracker.calls_recorded(named))
        stack.enter_context(tracker.saves_seen())
        stack.enter_context(tracker)
        yield tracker
