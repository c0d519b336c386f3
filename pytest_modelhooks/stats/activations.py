""":class:`ActivationStats`: per-module, per-batch activation statistics, computed where the
tensors live.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from pytest_modelhooks._torch import FUNCTORCH, graph_task_id, is_compiling
from pytest_modelhooks._tree import tensor_leaves
from pytest_modelhooks.hooks.callback import HookCallback
from pytest_modelhooks.hooks.core import unvmapped
from pytest_modelhooks.hooks.select import ModuleSpec
from pytest_modelhooks.stats.dead import RECTIFIERS, ChannelMaxima, RectifierOps
from pytest_modelhooks.stats.held import HELD_BYTES, HeldOutputs
from pytest_modelhooks.stats.host import host_channel_max, host_row, reduce_on_host
from pytest_modelhooks.stats.records import STATISTICS, LayerStats
from pytest_modelhooks.stats.reduce import (
    channel_dim,
    compiled_call,
    device_block_per_device,
    device_blocks,
    finish_device,
    fused_raw,
    nested_values,
    on_host,
    reduce_on_device,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from pytest_modelhooks.findings import Finding


_INDEX = tuple(f"[{index}]" for index in range(8))  # the paths of a short tuple's items


class ActivationStats(HookCallback):
    """Record activation statistics of ``model``'s modules, batch by batch.

    A *batch* is one forward of ``model``. Use it as a context manager around forward passes or
    training steps, or call ``on_train_begin()`` / ``on_train_end()`` from any loop.

    * ``modules``: default, the modules that own parameters (as fastai); also ``"all"``,
      ``"leaves"``, names, globs, types (see :func:`select_modules`).
    * ``every``: record one batch in ``every``; ``train_only``: record only forwards in
      training mode.
    * ``eps``: a value is near zero when ``|x| <= eps``.
    * ``with_hist``: also keep a histogram per batch (``hist_bins`` over ``hist_range``).
    * ``fused``: compute every statistic in one compiled pass (``torch.compile``) per
      activation, and on a GPU per group of outputs of one shape held to the batch's end (see
      ``max_held``). The first batch of each process pays a compile of several seconds, and it
      needs a C++ compiler on the CPU or Triton on a GPU; where it cannot compile, a warning,
      then separate passes. Worth it for long runs; see the README's Performance.
    * ``statistics``: which of :data:`STATISTICS` to compute (default all); each is a pass over
      every activation, so ``statistics=("mean", "std")`` with ``track_dead=False`` is the
      cheapest record. NaN and infinities are still found without ``"nonfinite"``: they show
      in the mean and std.
    * ``max_held``: off the CPU (a GPU, where every kernel launch counts), outputs are held
      until the batch ends and reduced together, a few launches per shape instead of ~9 per
      module; this bounds the bytes held (an int, or a string such as ``"1GiB"``; default
      256 MiB), which is what it can add to peak memory where nothing else keeps the outputs
      alive (``no_grad``). Past it the held outputs are reduced mid-batch. ``0`` reduces each
      output in its hook. An output changed in place after its hook (a BatchNorm's, under
      ``ReLU(inplace=True)``) is seen to change on the first batch and copied in its hook (one
      launch) from then on; under ``inference_mode``, which keeps no version counters, every
      output is.

    ``stats.stats`` is fastai's layout: a float tensor ``(2, num_modules, num_batches)`` of
    (mean, std) of each hooked module's (first) output. ``stats["encoder.conv1"]`` gives a
    :class:`LayerStats` with every statistic; tuple/dict outputs give one series per tensor
    (``stats["lstm[0]"]``, ``stats["out.logits"]``).

    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> with ActivationStats(net) as stats:
    ...     for _ in range(3):
    ...         _ = net(torch.randn(4, 8))
    >>> stats.stats.shape, stats.series_names
    (torch.Size([2, 2, 3]), ['0', '2'])
    """

    # long: the recorder's arguments, checked, and its whole state, declared in one place
    def __init__(
        self,
        model: nn.Module,
        modules: ModuleSpec = None,
        *,
        every: int = 1,
        train_only: bool = False,
        eps: float = 0.05,
        with_hist: bool = False,
        hist_bins: int = 80,
        hist_range: tuple[float, float] = (-10.0, 10.0),
        track_dead: bool = True,
        statistics: Sequence[str] = STATISTICS,
        fused: bool = False,
        max_held: int | str = HELD_BYTES,
    ) -> None:
        from pytest_modelhooks.units import parse_bytes

        unknown = sorted(set(statistics) - set(STATISTICS))
        if unknown or not statistics or isinstance(statistics, str):
            raise ValueError(
                f"statistics must be a non-empty collection of {', '.join(STATISTICS)}, "
                f"got statistics={statistics!r}"
            )
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got every={every!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got eps={eps!r}")
        if with_hist and (hist_bins < 1 or not hist_range[0] < hist_range[1]):
            raise ValueError(
                f"need hist_bins >= 1 and hist_range=(low, high) with low < high, "
                f"got hist_bins={hist_bins!r}, hist_range={hist_range!r}"
            )
        super().__init__(model, modules, detach=False)
        self.every = every
        self.train_only = train_only
        self.eps = eps
        self.with_hist = with_hist
        self.hist_bins = hist_bins
        self.hist_range = hist_range
        self.track_dead = track_dead
        self.statistics = frozenset(statistics)
        self.fused = fused
        self.max_held = parse_bytes(max_held, "max_held")
        self._fused_flags = (
            bool(self.statistics & {"mean", "std"}),
            "near_zero" in self.statistics,
            "nonfinite" in self.statistics,
            bool(self.statistics & {"min", "max"}),
        )
        self._held = HeldOutputs(eps, self.statistics, self.max_held, self._fused_flags if fused else None)
        self._flushed: list[tuple[list[int], torch.Tensor, list[int]]] = []  # this batch's held, reduced
        self._holdable: set[int] = set()  # series seen unchanged through a batch after their hook
        self._in_place: set[int] = set()  # series whose output changed in place after their hook
        self._conv1d = any(isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)) for module in model.modules())
        self._names_by_id = {id(module): name for name, module in self.named_modules}
        self._series: dict[tuple[int, str, int], int] = {}
        self._calls_this_batch: dict[int, int] = {}
        self._series_names: list[str] = []
        self._series_modules: list[str] = []
        self._series_types: list[str] = []
        self._series_first: dict[int, int] = {}  # module id -> its first series (fastai layout)
        self._forwards = 0
        self._recording = False
        self._pending: list[tuple[int, Any]] = []
        self._pending_hist: list[tuple[int, torch.Tensor]] = []
        # per recorded batch: (batch index, blocks); a block is (series ids, host rows) or
        # (series ids, device tensor of raw rows, element counts), one per device
        self._batches: list[tuple[int, list[tuple[Any, ...]]]] = []
        self._hists: list[tuple[int, list[int], torch.Tensor]] = []
        self._channel_max = ChannelMaxima()
        self._axes: dict[int, tuple[int, int, int | None]] = {}  # series -> (rank, vmap dims, axis)
        # this batch's tensors with dead units tracked, to tell which the model returned
        self._tracked: list[tuple[int, weakref.ref[torch.Tensor]]] = []
        self._model_outputs: set[int] = set()
        # series whose values are rectified: a ReLU-family module's own output, or a tensor a
        # ReLU-family module or function consumed; only there is "never above zero" dead
        self._rectified: set[int] = set()
        self._tracked_ids: dict[int, tuple[int, weakref.ref[torch.Tensor]]] = {}
        # this batch's recorded outputs by identity, to tell which recorded layer fed which
        self._output_ids: dict[int, tuple[int, weakref.ref[torch.Tensor]]] = {}
        self._producers: dict[int, set[int]] = {}  # series -> the series its module consumed
        self._aliases: dict[int, int] = {}  # series -> an earlier series holding the same tensor
        self._rectifier_ops: RectifierOps | None = None
        # (True: nothing to see, no dispatch mode; see _begin_batch)
        self._rectifiers_seen = not track_dead or any(
            isinstance(module, RECTIFIERS) for module in model.modules()
        )
        self._batch_handles: list[RemovableHandle] = []
        self._id_tuples: dict[tuple[int, ...], tuple[int, ...]] = {}
        self._saw_meta = False
        self._any_call = False  # whether a hooked module ran in any recorded forward
        self._cache: dict[str, Any] | None = None

    # ------------------------------------------------------------------ recording

    def on_train_begin(self, **kwargs: Any) -> None:
        """Register the hooks; the batch markers go on after the module hooks, so that the
        model's own output (when hooked) lands in the batch it belongs to."""
        super().on_train_begin(**kwargs)
        if not self._batch_handles:
            self._batch_handles = [
                self.model.register_forward_pre_hook(self._begin_batch),
                self.model.register_forward_hook(self._end_batch),
                # (always called: the mode that sees functional rectifiers must end with the forward)
                self.model.register_forward_hook(self._stop_seeing_rectifiers, always_call=True),
            ]
            if self.track_dead:
                self._batch_handles += [
                    module.register_forward_pre_hook(self._rectifier_input)
                    for module in self.model.modules()
                    if isinstance(module, RECTIFIERS)
                ]

    def remove(self) -> None:
        self._stop_seeing_rectifiers(self.model, (), None)
        self._held.clear()
        super().remove()
        for handle in self._batch_handles:
            handle.remove()
        self._batch_handles = []

    def _begin_batch(self, module: nn.Module, args: Any) -> None:
        if not is_compiling() and graph_task_id() != -1:
            # a forward inside backward: activation checkpointing recomputes the model
            # (``checkpoint(model, x)``); that batch was recorded on its way forward. (Not
            # asked while dynamo traces: the query would break its graph; compiled
            # checkpointing recomputes inside the compiled graph, without hooks.)
            self._recording = False
            return
        wanted = not self.train_only or self.model.training
        self._recording = wanted and self._forwards % self.every == 0
        self._forwards += 1
        self._pending = []
        self._pending_hist = []
        self._held.clear()
        self._flushed = []
        self._calls_this_batch = {}
        self._tracked = []
        self._tracked_ids = {}
        self._output_ids = {}
        if self._recording and not self._rectifiers_seen and not is_compiling():
            # A model without ReLU modules may call F.relu in its code: those are seen on the
            # first recorded batch alone, at the ATen level (a dispatch mode costs ~15% of a
            # CPU forward, once). A model with ReLU modules is read through their hooks.
            self._rectifiers_seen = True
            self._rectifier_ops = RectifierOps(self._rectifier_input_tensors)
            self._rectifier_ops.__enter__()  # type: ignore[no-untyped-call]

    def _end_batch(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._recording:
            return
        self._recording = False
        self._any_call = self._any_call or bool(self._calls_this_batch)
        batch = self._forwards - 1
        if self._tracked:
            # by identity, through weak references: a live tensor's id is its own
            returned = {id(tensor) for _, tensor in tensor_leaves(output)}
            for series, ref in self._tracked:
                tensor = ref()
                if tensor is not None and id(tensor) in returned:
                    self._model_outputs.add(series)
            self._tracked = []
        if self._held:
            self._reduce_held()
        if self._pending or self._flushed:
            blocks = device_block_per_device(device_blocks(self._pending) + self._flushed)
            self._flushed = []
            # the same series (and sizes) every batch: one tuple of each kept, not a list per batch
            self._batches.append((batch, [tuple(self._interned(part) for part in block) for block in blocks]))
        # histograms: one stack per device (a model may span devices)
        by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
        for series, hist in self._pending_hist:
            by_device.setdefault(hist.device, []).append((series, hist))
        for entries in by_device.values():
            self._hists.append(
                (batch, [series for series, _ in entries], torch.stack([h for _, h in entries]))
            )
        self._pending = []
        self._pending_hist = []
        self._cache = None

    def _interned(self, part: Any) -> Any:
        """A list of ints as the one tuple kept for its values; anything else as it is."""
        if not isinstance(part, list):
            return part
        key = tuple(part)
        return self._id_tuples.setdefault(key, key)

    def _series_id(self, module: nn.Module, path: str, call: int) -> int:
        key = (id(module), path, call)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = len(self._series_names)
            module_name = self._names_by_id.get(id(module), "?")
            name = module_name + path if module_name or not path else path.lstrip(".")
            if not module_name and path and any(name == other for other, _ in self.model.named_modules()):
                name = "(model)" + path  # the model's output "head" is not its layer "head"
            # a module called twice in one forward gets a series per call, as summaries get rows
            self._series_names.append(name if call == 1 else f"{name} [call {call}]")
            self._series_modules.append(module_name)
            self._series_types.append(type(module).__name__)
            self._series_first.setdefault(id(module), series)
        return series

    # long: runs in every hook of every module, where each helper call is host time a GPU step
    # pays per module; the usual case (one tensor in, one out) stays in one function
    def hook(self, module: nn.Module, input: Any, output: Any) -> None:
        """Reduce each floating-point (or complex) tensor ``module`` returned to its statistics."""
        # No no_grad() here: the tensors reduced here are detached, those held are reduced
        # under no_grad at the batch's end, and the context manager would cost more per call
        # than the rest of this method (every step of it runs in every hook: kept lean).
        if not self._recording:
            return
        key = id(module)
        call = self._calls_this_batch[key] = self._calls_this_batch.get(key, 0) + 1
        producers: Any = ()
        if self._output_ids and len(input) == 1 and type(input[0]) is torch.Tensor:
            entry = self._output_ids.get(id(input[0]))  # (one input, the usual case, inline)
            if entry is not None and entry[1]() is input[0]:
                producers = (entry[0],)
        elif self._output_ids:
            producers = self._fed_by(input)
        if isinstance(output, torch.Tensor):
            leaves = [("", output)]
        elif (
            type(output) is tuple
            and len(output) <= len(_INDEX)
            and all(item is None or type(item) is torch.Tensor for item in output)
        ):
            # (an attention's (output, weights), an RNN's (output, state)...: no tree walk)
            leaves = [(_INDEX[i], item) for i, item in enumerate(output) if item is not None]
        else:
            leaves = list(tensor_leaves(output))
        compiling = is_compiling()
        for path, tensor in leaves:
            complex_valued = False
            if not tensor.is_floating_point():
                if tensor.is_quantized:  # a quantized model's activations: their values, dequantized
                    tensor = tensor.dequantize()
                elif tensor.is_complex():
                    complex_valued = True
                else:
                    continue
            if tensor.numel() == 0:
                continue
            if FUNCTORCH is not None and not compiling and FUNCTORCH.is_functorch_wrapped_tensor(tensor):
                x, leading = unvmapped(tensor)  # under vmap: the whole batch, its dims in front
                plain = False  # (a torch.func level's tensor must not be held past its hook)
            else:
                x, leading, plain = tensor, 0, True
            if x.is_meta:  # shapes without values (a model built on meta): nothing to measure
                self._saw_meta = True
                continue
            if x.is_nested:
                x = nested_values(x)
            if complex_valued:
                # a spectral layer's output: its real and imaginary parts are the values (a
                # complex number is never "above zero", so no dead units)
                x = torch.view_as_real(x.resolve_conj())
            series = self._series.get((key, path, call))
            if series is None:
                series = self._series_id(module, path, call)
            ref = weakref.ref(tensor)
            earlier = self._output_ids.get(id(tensor))
            if earlier is not None and earlier[1]() is tensor and earlier[0] != series:
                self._aliases.setdefault(series, earlier[0])  # a block returning its last layer's
            self._output_ids[id(tensor)] = (series, ref)
            if producers:
                known = self._producers.get(series)
                if known is None:
                    self._producers[series] = set(producers)
                else:
                    known.update(producers)
            tracks_dead = self.track_dead and not complex_valued
            axis = None
            if tracks_dead:
                cached = self._axes.get(series)  # (looked up here: a method call per hook costs)
                if cached is not None and cached[0] == x.dim() and cached[1] == leading:
                    axis = cached[2]
                else:
                    axis = self._channel_axis(series, module, x, leading)
            if self.max_held and plain and not compiling and not on_host(x):
                # held to the batch's end (not detached here: an op each; reduced under no_grad)
                if series in self._holdable and not x.is_inference():  # (the usual case, inline)
                    if self._held.hold(series, x, axis):
                        self._reduce_held()
                else:
                    self._hold(series, x, axis)
            else:
                self._reduce_now(series, x.detach(), axis)
            if axis is not None:
                self._tracked.append((series, ref))
                self._tracked_ids[id(tensor)] = (series, ref)
                if isinstance(module, RECTIFIERS):
                    self._rectified.add(series)
            if self.with_hist:
                low, high = self.hist_range
                hist = torch.histc(x.detach().float(), self.hist_bins, low, high)
                self._pending_hist.append((series, hist))

    def _reduce_now(self, series: int, x: torch.Tensor, axis: int | None) -> None:
        """Reduce ``x`` in its hook: the host path, a fused pass, or the device passes."""
        host = on_host(x)
        if host and not self.fused:
            row, channel_max = host_row(x, self.eps, self.statistics, axis)
            self._pending.append((series, row))
            if channel_max is not None:
                self._channel_max.update(series, channel_max)
            return
        channel_max = None
        if axis is not None and host:
            channel_max = host_channel_max(x, axis)
        elif axis is not None:
            channel_max = x.amax(dim=[dim for dim in range(x.dim()) if dim != axis])
        fused = self._reduce_fused(x) if self.fused else None
        if fused is not None:
            self._pending.append((series, (fused, x.numel())))
        elif host:
            self._pending.append((series, reduce_on_host(x, self.eps, self.statistics, channel_max)))
        else:
            raw = reduce_on_device(x, self.eps, self.statistics, channel_max)
            self._pending.append((series, (raw, x.numel())))
        if channel_max is not None:
            self._channel_max.update(series, channel_max)

    def _hold(self, series: int, x: torch.Tensor, axis: int | None) -> None:
        """Hold ``x`` to the batch's end (see :mod:`pytest_modelhooks.stats.held`): itself when
        an earlier batch showed that it keeps its values, else a copy (one launch), and on the
        first batch the tensor too, to see whether it changes after the hook."""
        if series in self._holdable and not x.is_inference():
            over = self._held.hold(series, x, axis)
        else:
            over = self._held.hold(series, x.detach().clone(), axis, copy=True)
            if series not in self._in_place and not x.is_inference():  # (no version counter there)
                over = self._held.watch(series, x)
        if over:
            self._reduce_held()

    def _reduce_held(self) -> None:
        """Reduce the held outputs now (at the batch's end, or past ``max_held``)."""
        with torch.no_grad():  # (the outputs were held as they are, not detached)
            reduced = self._held.reduce()
        self._flushed += reduced.blocks
        for ids, channel_max in reduced.channel_max:
            self._channel_max.update_rows(ids, channel_max)
        if self.fused and self._held.fused is None:  # the compiled pass could not be built
            self.fused = False
        self._holdable.update(reduced.unchanged)
        # changed in place after the hook: reduced in it from now on (a held one misses this batch)
        self._in_place.update(reduced.changed)
        self._holdable.difference_update(reduced.changed)

    def _fed_by(self, input: Any) -> set[int]:
        """The recorded series among a module's inputs (by identity: they are alive)."""
        found = set()
        # plain tensors need no tree walk; one input (the usual case) needs no generator either
        single = len(input) == 1 and type(input[0]) is torch.Tensor
        if single or all(type(item) is torch.Tensor for item in input):
            leaves = input
        else:
            leaves = [tensor for _, tensor in tensor_leaves(input)]
        for tensor in leaves:
            entry = self._output_ids.get(id(tensor))
            if entry is not None and entry[1]() is tensor:
                found.add(entry[0])
        return found

    def _stop_seeing_rectifiers(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._recording:  # the forward raised before its end: let what it held go
            self._held.clear()
            self._flushed = []
        if self._rectifier_ops is not None:
            mode, self._rectifier_ops = self._rectifier_ops, None
            mode.__exit__(None, None, None)  # type: ignore[no-untyped-call]

    def _rectifier_input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._recording and self._tracked_ids:
            self._rectifier_input_tensors(args)

    def _rectifier_input_tensors(self, args: Any) -> None:
        """Mark the series whose tensor a rectifier is about to read (by identity: the tensor
        is alive, so its id is its own)."""
        # a ReLU's or an F.relu's one tensor (the usual case: no tree walk, ~3 us a call less)
        single = len(args) == 1 and type(args[0]) is torch.Tensor
        for tensor in args if single else [tensor for _, tensor in tensor_leaves(args)]:
            entry = self._tracked_ids.get(id(tensor))
            if entry is not None and entry[1]() is tensor:
                self._rectified.add(entry[0])

    def _reduce_fused(self, x: torch.Tensor) -> torch.Tensor | None:
        """The fused ``(6,)`` raw row of ``x``, or None (after one warning) where torch.compile
        cannot build the kernel here: the separate passes take over."""
        row = compiled_call("ActivationStats", fused_raw, x.reshape(-1), self.eps, *self._fused_flags)
        if row is None:
            self.fused = False
        return row

    def _channel_axis(self, series: int, module: nn.Module, x: torch.Tensor, leading: int = 0) -> int | None:
        """The dimension of ``x`` that holds ``module``'s channels, or None (``leading`` batch
        dims of vmap come first, before the dims the module sees); kept per series, for as long
        as its rank stays the same (:meth:`hook` looks it up)."""
        rank = x.dim()
        dim = channel_dim(module, rank - leading, self._conv1d)
        axis = None if dim is None else dim + leading
        self._axes[series] = (rank, leading, axis)
        return axis

    # ------------------------------------------------------------------ reading

    def _gather(self) -> dict[str, Any]:
        """Everything recorded, on the host: one transfer for all batches."""
        if self._cache is not None:
            return self._cache
        num_series, num_batches = len(self._series_names), len(self._batches)
        values = torch.full((len(STATISTICS), num_series, num_batches), math.nan, dtype=torch.float64)
        batch_ids = torch.tensor([batch for batch, _ in self._batches], dtype=torch.long)
        ran = torch.zeros((num_series, num_batches), dtype=torch.bool)
        for column, (_, blocks) in enumerate(self._batches):
            for block in blocks:
                if len(block) == 3:  # device rows, finished on the host
                    ids, raw, counts = block
                    rows = finish_device(
                        raw.to("cpu", torch.float64), torch.tensor(counts, dtype=torch.float64)
                    )
                else:
                    ids, rows = block
                values[:, ids, column] = rows.T
                ran[ids, column] = True
        dead = self._channel_max.dead()
        hists: dict[int, torch.Tensor] = {}
        if self._hists:
            column_of = {batch: column for column, batch in enumerate(batch_ids.tolist())}
            for batch, ids, stacked in self._hists:
                host = stacked.cpu()
                for row, series in enumerate(ids):
                    hist = hists.setdefault(series, torch.zeros(num_batches, self.hist_bins))
                    hist[column_of[batch]] = host[row]
        self._cache = {"values": values, "ran": ran, "batches": batch_ids, "dead": dead, "hists": hists}
        return self._cache

    @property
    def series_names(self) -> list[str]:
        """Every recorded series, in order of first appearance (execution order)."""
        return list(self._series_names)

    @property
    def num_batches(self) -> int:
        """How many batches were recorded."""
        return len(self._batches)

    @property
    def stats(self) -> torch.Tensor:
        """fastai's layout: ``(2, num_modules, num_batches)`` of (mean, std), one row per hooked
        module in ``modules`` order (its first output tensor; NaN where it never ran)."""
        gathered = self._gather()
        rows = []
        for module in self.modules:
            series = self._series_first.get(id(module))
            if series is None:
                rows.append(torch.full((2, self.num_batches), math.nan, dtype=torch.float64))
            else:
                rows.append(gathered["values"][:2, series])
        if not rows:
            return torch.empty(2, 0, self.num_batches)
        return torch.stack(rows, dim=1).float()

    def __len__(self) -> int:
        return len(self._series_names)

    def __iter__(self) -> Iterator[LayerStats]:
        return (self[index] for index in range(len(self)))

    def __getitem__(self, key: int | str) -> LayerStats:
        """The :class:`LayerStats` of a series, by position or name."""
        if isinstance(key, str):
            if key not in self._series_names:
                shown = ", ".join(self._series_names[:12]) or "(none recorded yet)"
                raise KeyError(f"no statistics for {key!r}; recorded series are: {shown}")
            index = self._series_names.index(key)
        else:
            index = range(len(self._series_names))[key]
        gathered = self._gather()
        values = gathered["values"][:, index]
        dead, channels = gathered["dead"].get(index, (None, None))
        return LayerStats(
            name=self._series_names[index],
            module=self._series_modules[index],
            type=self._series_types[index],
            position=index,
            batches=gathered["batches"],
            ran=gathered["ran"][index],
            mean=values[0],
            std=values[1],
            near_zero=values[2],
            nonfinite=values[3],
            min=values[4],
            max=values[5],
            dead=dead,
            channels=channels,
            hist=gathered["hists"].get(index),
            model_output=index in self._model_outputs,
            rectified=index in self._rectified,
            inputs_from=tuple(
                sorted(self._series_names[series] for series in self._producers.get(index, ()))
            ),
            same_as=self._series_names[self._aliases[index]] if index in self._aliases else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"batches": [...], "series": {name: {...}}}``."""
        return {
            "batches": self._gather()["batches"].tolist(),
            "series": {layer.name: layer.to_dict() for layer in self},
        }

    # ------------------------------------------------------------------ checks and pictures

    def findings(
        self,
        *,
        std: tuple[float, float] | None = None,
        max_dead: float | None = None,
        max_near_zero: float | None = None,
        max_std_growth: float | None = None,
        allow_nonfinite: bool = False,
        exclude: ModuleSpec = None,
    ) -> list[Finding]:
        """The health findings as data (see :func:`pytest_modelhooks.health.rules.activation_findings`).
        With no batch recorded there is nothing to judge: one finding says why, so that neither
        ``check()`` nor ``assert not stats.findings()`` passes vacuously."""
        from pytest_modelhooks.findings import Finding
        from pytest_modelhooks.health.rules import activation_findings, no_batch_reason

        if not self.num_batches:
            why = no_batch_reason(self)
            return [Finding("", type(self.model).__name__, "batches", 0.0, ">= 1", None, why)]
        return activation_findings(
            self,
            std=std,
            max_dead=max_dead,
            max_near_zero=max_near_zero,
            max_std_growth=max_std_growth,
            allow_nonfinite=allow_nonfinite,
            exclude=exclude,
        )

    def check(
        self,
        *,
        std: tuple[float, float] | None = None,
        max_dead: float | None = None,
        max_near_zero: float | None = None,
        max_std_growth: float | None = None,
        allow_nonfinite: bool = False,
        exclude: ModuleSpec = None,
    ) -> None:
        """Raise ``AssertionError`` listing every offending layer (see :meth:`findings`; also
        when nothing was recorded)."""
        __tracebackhide__ = True
        from pytest_modelhooks.findings import raise_for

        raise_for(
            self.findings(
                std=std,
                max_dead=max_dead,
                max_near_zero=max_near_zero,
                max_std_growth=max_std_growth,
                allow_nonfinite=allow_nonfinite,
                exclude=exclude,
            ),
            "activation",
        )

    def plot(
        self,
        statistics: Sequence[str] = ("mean", "std", "near_zero"),
        path: str | Path | None = None,
        *,
        std: tuple[float, float] | None = None,
        max_near_zero: float | None = None,
    ) -> Figure:
        """Plot ``statistics`` per layer over batches (needs matplotlib), with the bounds given
        drawn as dashed lines; see :func:`pytest_modelhooks.report.plots.plot_stats`."""
        from pytest_modelhooks.report.plots import plot_stats

        return plot_stats(self, statistics, path, std=std, max_near_zero=max_near_zero)

    def color_dim(self, layer: int | str, path: str | Path | None = None) -> Figure:
        """The histogram-over-batches image of ``layer`` (needs ``with_hist=True``)."""
        from pytest_modelhooks.report.plots import color_dim

        return color_dim(self, layer, path)

    def __repr__(self) -> str:
        return f"<ActivationStats: {len(self)} series, {self.num_batches} batches>"
