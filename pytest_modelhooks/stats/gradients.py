""":class:`GradientStats`: per-parameter gradient statistics after each backward, and whether each
parameter changed (optimizers stepping, ``.grad`` lost before a step).
"""

from __future__ import annotations

import importlib
import math
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

from pytest_modelhooks._torch import at_backward_end, graph_task_id, is_compiling, scaler_scale
from pytest_modelhooks.errors import describe, not_a_module
from pytest_modelhooks.hooks.core import weak_hook
from pytest_modelhooks.hooks.select import ModuleSpec, loaded_class, select_modules
from pytest_modelhooks.stats.calls import ModuleCalls
from pytest_modelhooks.stats.held import STACK_BYTES
from pytest_modelhooks.stats.host import grad_on_host
from pytest_modelhooks.stats.records import GRAD_STATISTICS, ParamGradStats, SteppedOptimizer
from pytest_modelhooks.stats.reduce import (
    compiled_call,
    finish_grads,
    fused_grad_raw,
    fused_grad_rows,
    grad_on_device,
    grad_rows,
    pack_grad_rows,
    sparse_grad_raw,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from pytest_modelhooks.findings import Finding


def on_host(grad: torch.Tensor) -> bool:
    """Whether a gradient is reduced with host reads (CPU) or on its device, where a backward's
    gradients are held to its end and reduced together (see :func:`grad_rows`)."""
    return grad.device.type == "cpu"


_HELD: Any = object()  # a pending gradient whose row comes with the others at the backward's end


class _Seen:
    """What the step pre-hook saw of one optimizer (positions into GradientStats.params)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.steps = 0
        self.positions: dict[int, Any] = {}  # position -> its group's learning rate at the last step


_UNINITIALIZED = -1  # the version given to a lazy parameter's fingerprint before it exists


def _fingerprint(param: torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """A parameter's version counter and ``(sum, L2 norm)`` of its values accumulated in float64,
    on its device (no sync, no copy), or None where there are no values. Either changes when
    an optimizer updates it: in-place ops bump the counter (fused optimizer kernels do not),
    and any real update moves the float64 sums (an element's change of 1e-7 of its size moves
    them by ~1e-10 of theirs, a million times float64's resolution)."""
    if isinstance(param, UninitializedParameter):
        return _UNINITIALIZED, None  # a lazy module's, before its first forward: no values yet
    data = param.detach()
    dtensor = loaded_class("torch.distributed.tensor", "DTensor")
    if dtensor is not None and isinstance(data, dtensor):
        data = data.to_local()  # this rank's shard: it changes when the parameter does
    if data.is_meta or data.numel() == 0:  # no values (an FSDP2 rank may hold none): unknown
        return param._version, None
    if data.is_complex():
        data = torch.view_as_real(data)
    sums = torch.stack([data.sum(dtype=torch.float64), torch.linalg.vector_norm(data, dtype=torch.float64)])
    return param._version, sums


def _changed(
    before: list[tuple[int, torch.Tensor | None]], after: list[tuple[int, torch.Tensor | None]]
) -> list[bool | None]:
    """Per parameter: whether its fingerprint changed (None where there were no values to
    compare: meta, a lazy parameter never run, an empty shard). One host read per device."""
    changed: list[bool | None] = [
        True if old[0] != new[0] else None if old[1] is None or new[1] is None else False
        for old, new in zip(before, after, strict=True)
    ]
    by_device: dict[torch.device, list[int]] = {}
    for position, (old, new) in enumerate(zip(before, after, strict=True)):
        if changed[position] is False and old[1] is not None and new[1] is not None:
            by_device.setdefault(old[1].device, []).append(position)
    for positions in by_device.values():
        old_sums = torch.stack([before[position][1] for position in positions])  # type: ignore[misc]
        new_sums = torch.stack([after[position][1] for position in positions])  # type: ignore[misc]
        # NaN != NaN: a parameter gone non-finite counts as changed, which it did
        moved = (old_sums != new_sums).any(dim=1).cpu().tolist()
        for position, flag in zip(positions, moved, strict=True):
            changed[position] = bool(flag)
    return changed


def _is_zero_lr(lr: Any) -> bool:
    """Whether a param group's learning rate (a number or a tensor, read now) is 0."""
    try:
        return float(lr) == 0.0
    except (TypeError, ValueError, RuntimeError):
        return False  # no lr (an optimizer without one) or not a number


class GradientStats:
    """Record gradient statistics of ``model``'s parameters after each backward.

    Use it as a context manager around training steps. Each parameter's statistics are taken
    from its accumulated ``.grad`` right after backward writes it (a post-accumulate-grad
    hook), so ``zero_grad()`` anywhere in the loop does not matter, and gradient clipping,
    which runs after backward, does not hide an explosion from them. A *step* ends at the next
    forward of ``model``, when a parameter's gradient arrives again (a second backward),
    at :meth:`end_step`, or when the block ends. Parameters that require
    grad but never got one are reported by :meth:`unused`; frozen parameters are not tracked.
    ``fused=True`` reduces each gradient in one ``torch.compile``d pass, as
    :class:`ActivationStats` does. Off the CPU the gradients of one backward are held to its end
    and reduced together there, stacked per shape (a few launches per shape, not a set per
    parameter), still before ``backward()`` returns.

    With mixed precision, pass the ``torch.amp.GradScaler`` as ``scaler=``: backward then writes
    gradients multiplied by the loss scale, and the statistics are divided by the scale of
    their step (read on the device, no sync). A step whose gradients overflowed is one the
    scaler skips (:meth:`skipped_steps`): the checks leave it out, and fail only when no step
    was finite. ``modules=`` (names, globs, types or modules, as elsewhere) records only the
    parameters of those modules (a fine-tuned head, the last blocks of a large model): fewer
    hooks, and checks about those alone.

    While recording, every optimizer's ``step()`` is watched (torch's global step pre-hook,
    host work only): :meth:`stepped_optimizers` says which stepped on the model and what they
    hold, :meth:`lost_before_step` which gradients were gone by then, and with the parameters'
    fingerprints at the block's two ends, :meth:`not_updated` and the checks say which
    parameters an optimizer should have changed but did not, and why.

    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    >>> with GradientStats(net) as grads:
    ...     net(torch.randn(5, 3)).sum().backward()
    >>> grads.num_steps, grads.unused()
    (1, [])
    """

    def __init__(
        self, model: nn.Module, *, modules: ModuleSpec = None, fused: bool = False, scaler: Any = None
    ) -> None:
        if not isinstance(model, nn.Module):
            raise not_a_module("model", model)
        if scaler is not None and not (hasattr(scaler, "scale") and hasattr(scaler, "get_scale")):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {describe(scaler)}")
        self.model = model
        self.fused = fused
        self.scaler = scaler
        self._scales: list[torch.Tensor | float | None] = []  # per step: the loss scale
        self._pending_scale: torch.Tensor | float | None = None
        self.params = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
        if modules is not None:
            # the trainable parameters of the selected modules (their submodules' included),
            # under the model's own names and in its order
            chosen = {
                id(param) for _, module in select_modules(model, modules) for param in module.parameters()
            }
            self.params = [(name, param) for name, param in self.params if id(param) in chosen]
            if not self.params:
                raise ValueError(
                    f"modules={modules!r} selects no trainable parameter of {type(model).__name__} "
                    f"(its parameters are frozen, or it has none)"
                )
        self._index = {id(param): position for position, (_, param) in enumerate(self.params)}
        self._sizes_known: list[int] | None = None  # element counts, once none is lazy
        self._saw_meta = False
        self._handles: list[Any] = []
        self._pending: dict[int, Any] = {}
        # this backward's gradients held to its end, and the rows reduced from them there
        self._held: list[tuple[int, torch.Tensor]] = []
        self._held_rows: list[tuple[list[int], torch.Tensor]] = []
        self._queued_for = -1  # the backward whose end reduces the held gradients
        # per step: the parameters' positions in the order their gradients arrived, and their
        # rows packed (see pack_grad_rows)
        self._steps: list[tuple[tuple[int, ...], Any, bool]] = []
        self._orders: dict[tuple[int, ...], tuple[int, ...]] = {}  # one tuple per distinct order
        self._cache: torch.Tensor | None = None
        # the parameters' fingerprints when recording began and when it ended (see updated())
        self._before: list[tuple[int, torch.Tensor | None]] | None = None
        self._after: list[tuple[int, torch.Tensor | None]] | None = None
        # the optimizers that stepped on these parameters, and the parameters whose gradient
        # was gone (None) when one stepped, though backward had just given them one
        self._optimizers: dict[int, _Seen] = {}
        self._lost: dict[int, str] = {}
        # the modules holding tracked parameters themselves (and the model), watched until each
        # runs with gradients on: what tells why a parameter got no gradient
        self.calls = ModuleCalls(model, {name.rpartition(".")[0] for name, _ in self.params})

    def __enter__(self) -> GradientStats:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Register the hooks (idempotent)."""
        if self._handles:
            return
        if self._before is None:
            with torch.no_grad():
                self._before = [_fingerprint(param) for _, param in self.params]
        self._after = None
        try:
            lazy: dict[int, nn.Module] = {}
            for name, param in self.params:
                if isinstance(param, UninitializedParameter):
                    # a lazy module's parameter takes no hook before its first forward
                    owner = self.model.get_submodule(name.rpartition(".")[0])
                    lazy[id(owner)] = owner
                    continue
                self._hook(param)
            for owner in lazy.values():
                self._handles.append(owner.register_forward_hook(self._materialized))
            if not isinstance(self.model, torch.jit.ScriptModule):
                self.calls.start()
                # a forward starts a step. (TorchScript takes no Python module hooks; its
                # parameters take tensor hooks, and a step ends when a gradient arrives again.)
                starts = self.model.register_forward_pre_hook(lambda module, args: self.end_step())
                self._handles.append(starts)
            # every optimizer's step (a global hook, torch >= 2.0): which parameters it holds
            optimizer_module = importlib.import_module("torch.optim.optimizer")  # (not an attribute)
            register = getattr(optimizer_module, "register_optimizer_step_pre_hook", None)
            if register is not None:
                handle = register(weak_hook(self, "_optimizer_step"))
                weakref.finalize(self, handle.remove)  # a process-wide hook: gone with us
                self._handles.append(handle)
        except BaseException:
            self.stop()
            raise

    def _optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Before any optimizer's ``step()``: note which of the model's parameters it holds (and
        their learning rates), and which of those had a gradient from the backward just
        recorded but none now (``zero_grad()`` between ``backward()`` and ``step()``). Host
        work only: no device read."""
        held: dict[int, Any] = {}
        for group in optimizer.param_groups:
            for param in group["params"]:
                position = self._index.get(id(param))
                if position is not None:
                    held[position] = group.get("lr")
        if not held:
            return  # another model's optimizer
        seen = self._optimizers.get(id(optimizer))
        if seen is None:
            seen = self._optimizers[id(optimizer)] = _Seen(type(optimizer).__name__)
        seen.steps += 1
        seen.positions.update(held)
        for position in held:
            if position in self._pending and self.params[position][1].grad is None:
                self._lost.setdefault(position, seen.name)

    def stepped_optimizers(self) -> list[SteppedOptimizer]:
        """The optimizers whose ``step()`` ran on the model's parameters while recording
        (seen through torch's global optimizer hooks), in the order they first stepped."""
        found = []
        for seen in self._optimizers.values():
            positions = sorted(seen.positions)
            zero_lr = [position for position in positions if _is_zero_lr(seen.positions[position])]
            found.append(
                SteppedOptimizer(
                    seen.name,
                    seen.steps,
                    tuple(self.params[position][0] for position in positions),
                    tuple(self.params[position][0] for position in zero_lr),
                )
            )
        return found

    def lost_before_step(self) -> dict[str, str]:
        """Parameters that got a gradient in backward whose ``.grad`` was None when an
        optimizer's ``step()`` then ran (so it skipped them), with that optimizer's name: the
        ``backward(); zero_grad(); step()`` order, or a ``.grad`` set to None by hand."""
        return {self.params[position][0]: name for position, name in sorted(self._lost.items())}

    def _hook(self, param: torch.Tensor) -> None:
        handle = param.register_post_accumulate_grad_hook(weak_hook(self, "_record"))  # type: ignore[no-untyped-call]
        self._handles.append(handle)

    def _materialized(self, module: nn.Module, args: Any, output: Any) -> None:
        """After a lazy module's first forward, its parameters exist: hook them, and take their
        fingerprints now (their values start here)."""
        for param in module._parameters.values():
            if param is None or isinstance(param, UninitializedParameter):
                continue
            position = self._index.get(id(param))
            if position is None:
                continue  # frozen: not tracked
            if self._before is not None and self._before[position][0] == _UNINITIALIZED:
                with torch.no_grad():
                    self._before[position] = _fingerprint(param)
                self._hook(param)

    def _sizes(self) -> list[int]:
        """The parameters' element counts as the raw rows count them: real numbers, so two per
        complex element (a lazy parameter counts 0 until it is materialized)."""
        if self._sizes_known is not None:
            return self._sizes_known
        sizes = [
            0 if isinstance(param, UninitializedParameter) else param.numel() * (1 + param.is_complex())
            for _, param in self.params
        ]
        if not any(isinstance(param, UninitializedParameter) for _, param in self.params):
            self._sizes_known = sizes
        return sizes

    def stop(self) -> None:
        """Close the current step and remove every hook (idempotent)."""
        self.end_step()
        if self._handles and self._before is not None:
            with torch.no_grad():
                self._after = [_fingerprint(param) for _, param in self.params]
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.calls.stop()

    def _record(self, param: torch.Tensor) -> None:
        # (detached below: no graph is recorded, no no_grad() needed)
        grad = param.grad
        if grad is None:
            return
        if grad.is_meta:  # shapes without values: nothing to measure (findings say so)
            self._saw_meta = True
            return
        grad = grad.detach()
        dtensor = loaded_class("torch.distributed.tensor", "DTensor")
        if dtensor is not None and isinstance(grad, dtensor):
            # a shard (FSDP2, tensor parallelism): the whole gradient, gathered, gives the
            # statistics of the parameter (a shard's norm is not the norm, and its element
            # count is not the parameter's). Every rank records the same steps, in order.
            grad = grad.full_tensor()
        raw: Any
        if grad.layout != torch.strided:  # sparse (nn.Embedding(sparse=True)): its stored values
            raw = sparse_grad_raw(grad)
        else:
            if grad.is_complex():  # over the real and imaginary parts (the norm is the complex one)
                grad = torch.view_as_real(grad.resolve_conj())
            if not on_host(grad) and self._hold(grad):
                raw = _HELD  # (reduced with the others at the backward's end, fused or not)
            else:
                flat, correction = grad.reshape(-1), 1 if grad.numel() > 1 else 0
                raw = compiled_call("GradientStats", fused_grad_raw, flat, correction) if self.fused else None
                if raw is None:
                    self.fused = False  # (after compile failed: separate passes from now on)
                    raw = grad_on_host(grad) if on_host(grad) else grad_on_device(grad)
        index = self._index[id(param)]
        if index in self._pending:  # a second backward with no forward in between: a new step
            self.end_step()
        if not self._pending and self.scaler is not None:
            self._pending_scale = self._current_scale()
        self._pending[index] = raw
        if raw is _HELD:
            self._held.append((index, grad))

    def _hold(self, grad: torch.Tensor) -> bool:
        """Whether ``grad`` can wait for the end of this backward, to be reduced with the others
        (a few launches per shape, not a set per parameter): the reduction is queued there
        once per backward. Clipping and optimizers run after backward returns, so the values
        reduced are still the ones backward wrote."""
        if is_compiling():
            return False
        task = graph_task_id()
        if task != self._queued_for:
            if not at_backward_end(self._reduce_held):
                return False
            self._queued_for = task
        return True

    def _reduce_held(self) -> None:
        """Reduce the held gradients: stacked by device, dtype and shape (at most
        :data:`~pytest_modelhooks.stats.held.STACK_BYTES` a stack), one set of passes each."""
        self._queued_for = -1
        groups: dict[tuple[Any, ...], list[list[tuple[int, torch.Tensor]]]] = {}
        for index, grad in self._held:
            runs = groups.setdefault((grad.device, grad.dtype, grad.shape), [[]])
            if runs[-1] and (len(runs[-1]) + 1) * grad.nbytes > STACK_BYTES:
                runs.append([])
            runs[-1].append((index, grad))
        self._held = []
        with torch.no_grad():
            for runs in groups.values():
                for run in runs:
                    grads = [grad for _, grad in run]
                    stacked = grads[0].unsqueeze(0) if len(grads) == 1 else torch.stack(grads)
                    self._held_rows.append(([index for index, _ in run], self._rows(stacked)))

    def _rows(self, stacked: torch.Tensor) -> torch.Tensor:
        """:func:`grad_rows`, or with ``fused`` one compiled pass for the whole stack."""
        if self.fused:
            flat = stacked.reshape(stacked.shape[0], -1)
            rows = compiled_call("GradientStats", fused_grad_rows, flat, 1 if flat.shape[1] > 1 else 0)
            if rows is not None:
                return rows
            self.fused = False  # (after one warning: separate passes from now on)
        return grad_rows(stacked)

    def _current_scale(self) -> torch.Tensor | float | None:
        """The scaler's loss scale now, as a copy on its device (``update()`` changes it in
        place); None when the scaler is disabled."""
        scaler = self.scaler
        if not scaler.is_enabled():
            return None
        scale = scaler_scale(scaler)  # the device tensor behind get_scale()
        if isinstance(scale, torch.Tensor):
            return scale.detach().clone()
        return float(scaler.get_scale())

    def end_step(self) -> None:
        """Close the current step, if any gradient arrived since the last one."""
        if self._held:  # (a backward that raised before its end)
            self._reduce_held()
        if self._pending:
            order, rows, raw = self._packed()
            self._steps.append((self._orders.setdefault(order, order), rows, raw))
            self._scales.append(self._pending_scale)
            self._pending = {}
            self._pending_scale = None
            self._cache = None

    def _packed(self) -> tuple[tuple[int, ...], torch.Tensor, bool]:
        """This step's parameter order, its rows and whether they are raw (see
        pack_grad_rows), the rows reduced together at the backward's end included."""
        held, self._held_rows = self._held_rows, []
        alone = {index: value for index, value in self._pending.items() if value is not _HELD}
        sizes = self._sizes()
        if not held:
            rows, raw = pack_grad_rows(alone, sizes)
            return tuple(alone), rows, raw
        parts = [(ids, rows, True) for ids, rows in held]
        if alone:
            parts.append((list(alone), *pack_grad_rows(alone, sizes)))
        order = tuple(index for ids, _, _ in parts for index in ids)
        if all(raw for _, _, raw in parts) and len({rows.device for _, rows, _ in parts}) == 1:
            return order, torch.cat([rows for _, rows, _ in parts]), True
        # rows of several kinds (host and device, two devices): finished here, a read each
        finished = [
            finish_grads(rows, [sizes[at] for at in ids]) if raw else rows for ids, rows, raw in parts
        ]
        return order, torch.cat(finished), False

    @property
    def num_steps(self) -> int:
        """How many steps (backward passes) were recorded."""
        return len(self._steps) + (1 if self._pending else 0)

    def _gather(self) -> torch.Tensor:
        self.end_step()
        if self._cache is None:
            values = torch.full(
                (len(GRAD_STATISTICS), len(self.params), len(self._steps)), math.nan, dtype=torch.float64
            )
            for column, (order, rows, raw) in enumerate(self._steps):
                if raw:
                    rows = finish_grads(rows, [self._sizes()[at] for at in order])
                values[:, list(order), column] = rows.T
            if self.scaler is not None:
                # the loss scale multiplies every gradient: divide it out of the sizes (not the
                # non-finite count); one host read of every step's scale, here
                on_device = [scale.reshape(()) for scale in self._scales if isinstance(scale, torch.Tensor)]
                read = iter(torch.stack(on_device).double().cpu().tolist() if on_device else [])
                scales = [
                    next(read) if isinstance(scale, torch.Tensor) else 1.0 if scale is None else scale
                    for scale in self._scales
                ]
                values[:4] /= torch.tensor(scales, dtype=torch.float64)
            self._cache = values
        return self._cache

    def skipped_steps(self) -> list[int]:
        """With ``scaler=``: the steps whose gradients held an infinity or NaN (the scaler skips
        their optimizer step and lowers the scale). Without a scaler: none."""
        if self.scaler is None:
            return []
        nonfinite = torch.nan_to_num(self._gather()[4], nan=0.0)
        return [int(step) for step in (nonfinite > 0).any(dim=0).nonzero().flatten().tolist()]

    def backward_order(self, step: int = 0) -> list[str]:
        """The parameters whose gradient arrived in ``step``, in the order backward finished
        them: the layers nearest the loss first. A non-finite gradient starts where this order
        first meets one (the checks name it, and the finite one before it).

        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> with GradientStats(net) as grads:
        ...     net(torch.randn(5, 3)).sum().backward()
        >>> grads.backward_order()[0].startswith("2.")
        True
        """
        self.end_step()
        steps = range(len(self._steps))
        try:
            order = self._steps[steps[step]][0]
        except IndexError:
            raise IndexError(f"step={step} is out of range: {len(self._steps)} step(s) recorded") from None
        return [self.params[position][0] for position in order]

    def __len__(self) -> int:
        return len(self.params)

    def __iter__(self) -> Iterator[ParamGradStats]:
        return (self[index] for index in range(len(self)))

    def __getitem__(self, key: int | str) -> ParamGradStats:
        """The :class:`ParamGradStats` of a parameter, by position or qualified name."""
        names = [name for name, _ in self.params]
        if isinstance(key, str):
            if key not in names:
                raise KeyError(f"{key!r} is not a trainable parameter of {type(self.model).__name__}")
            index = names.index(key)
        else:
            index = range(len(names))[key]
        values = self._gather()[:, index]
        name, param = self.params[index]
        return ParamGradStats(name, name.rpartition(".")[0], tuple(param.shape), *values)

    def unused(self) -> list[str]:
        """Parameters that require grad but got no gradient in any recorded step."""
        return [stats.name for stats in self if not stats.got_grad]

    def updated(self) -> dict[str, bool | None]:
        """Per parameter: whether anything (an optimizer step) changed it between the start of
        recording and its end (or now, while recording); None where its values are on meta.
        Read from version counters and float64 sums taken at those two moments only: no copy
        of the weights, no cost per step. :meth:`not_updated` lists the suspects.

        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
        >>> optimizer = torch.optim.SGD(net[0].parameters(), lr=0.1)  # net[1] forgotten
        >>> with GradientStats(net) as grads:
        ...     net(torch.randn(5, 3)).sum().backward()
        ...     optimizer.step()
        >>> grads.updated()
        {'0.weight': True, '0.bias': True, '1.weight': False, '1.bias': False}
        >>> grads.not_updated()
        ['1.weight', '1.bias']
        """
        if self._before is None:
            return dict.fromkeys((name for name, _ in self.params), None)
        after = self._after
        if after is None:  # still recording: compare with now
            with torch.no_grad():
                after = [_fingerprint(param) for _, param in self.params]
        changed = _changed(self._before, after)
        return {name: flag for (name, _), flag in zip(self.params, changed, strict=True)}

    def not_updated(self) -> list[str]:
        """Parameters that got a gradient but never changed, while an optimizer stepped or
        others changed: left out of its param groups, a gradient of zeros, a ``.grad`` gone
        before ``step()`` (the checks tell these apart). Empty when no optimizer stepped and
        nothing changed (nothing to judge). Frozen parameters are not tracked."""
        updated = self.updated()
        if not any(updated.values()) and not self._optimizers:
            return []
        return [stats.name for stats in self if stats.got_grad and updated[stats.name] is False]

    def module_norms(self) -> dict[str, torch.Tensor]:
        """Per module (qualified name): the gradient norm over its own parameters, per step."""
        norms: dict[str, torch.Tensor] = {}
        for stats in self:
            squared = torch.nan_to_num(stats.norm, nan=0.0) ** 2
            norms[stats.module] = norms.get(stats.module, torch.zeros_like(squared)) + squared
        return {module: total.sqrt() for module, total in norms.items()}

    def total_norm(self) -> torch.Tensor:
        """Per step: the norm over every recorded parameter's gradient, the figure training
        logs show and ``clip_grad_norm_`` returns (and clips). The statistics are those of the
        gradients backward wrote, before any clipping: an explosion shows even where clipping
        keeps it from the optimizer.

        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
        >>> with GradientStats(net) as grads:
        ...     net(torch.randn(5, 3)).sum().backward()
        ...     clipped = nn.utils.clip_grad_norm_(net.parameters(), max_norm=1.0)
        >>> bool(torch.isclose(grads.total_norm()[0], clipped.double()))
        True
        """
        squared = torch.nan_to_num(self._gather()[0], nan=0.0) ** 2  # (parameters, steps)
        return squared.sum(dim=0).sqrt()

    def findings(
        self,
        *,
        max_norm: float | None = None,
        min_norm: float | None = None,
        require_grad: bool = True,
        require_update: bool | None = None,
        exclude: ModuleSpec = None,
    ) -> list[Finding]:
        """The gradient findings as data (see :func:`pytest_modelhooks.health.rules.gradient_findings`).
        With no backward recorded, one finding says so (rather than every parameter unused)."""
        from pytest_modelhooks.findings import Finding
        from pytest_modelhooks.health.rules import gradient_findings

        if not self.num_steps:
            what = (
                f"{len(self.params)} parameter(s) require grad"
                if self.params
                else "no parameter requires grad"
            )
            note = f"no backward pass was recorded ({what}); call loss.backward() inside the `with` block"
            if self.params and self.calls.seen() and self.calls.ran(""):
                note = (
                    f"no backward pass reached the model ({what}), though it ran with gradients on: "
                    "no loss.backward() inside the `with` block, or a loss that does not depend on "
                    "its output (detached, or computed without it)"
                )
            if self._saw_meta:
                note = "no backward pass was recorded: the gradients were on the meta device (no values)"
            return [Finding("", type(self.model).__name__, "steps", 0.0, ">= 1", None, note)]
        return gradient_findings(
            self,
            max_norm=max_norm,
            min_norm=min_norm,
            require_grad=require_grad,
            require_update=require_update,
            exclude=exclude,
        )

    def check(
        self,
        *,
        max_norm: float | None = None,
        min_norm: float | None = None,
        require_grad: bool = True,
        require_update: bool | None = None,
        exclude: ModuleSpec = None,
    ) -> None:
        """Raise ``AssertionError`` naming vanishing, exploding, non-finite and unused gradients,
        and parameters an optimizer left unchanged (``require_update``, see
        :func:`pytest_modelhooks.health.rules.gradient_findings`), or that no backward pass was
        recorded."""
        __tracebackhide__ = True
        from pytest_modelhooks.findings import raise_for

        found = self.findings(
            max_norm=max_norm,
            min_norm=min_norm,
            require_grad=require_grad,
            require_update=require_update,
            exclude=exclude,
        )
        raise_for(found, "gradient")

    def plot(
        self,
        path: str | Path | None = None,
        *,
        max_norm: float | None = None,
        min_norm: float | None = None,
    ) -> Figure:
        """The gradient flow, per parameter and per module (needs matplotlib), with the bounds
        given drawn as dashed lines; see :func:`pytest_modelhooks.report.plots.plot_grads`."""
        from pytest_modelhooks.report.plots import plot_grads

        return plot_grads(self, path, max_norm=max_norm, min_norm=min_norm)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per parameter, every statistic per step (NaN as None)."""
        result: dict[str, Any] = {}
        for stats in self:
            result[stats.name] = {
                statistic: [
                    None if math.isnan(value) else value for value in getattr(stats, statistic).tolist()
                ]
                for statistic in GRAD_STATISTICS
            }
        return result

    def __repr__(self) -> str:
        return f"<GradientStats: {len(self)} parameters, {self.num_steps} steps>"
