"""The engines that run a traced forward: ``meta`` stand-ins for the weights, ``FakeTensorMode``,
or real tensors, tried in that order by :func:`trace_model`; whatever runs, the model ends as it
was found (weights, buffers, flags, hooks).
"""

from __future__ import annotations

import gc
import logging
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Literal

import torch
from torch import nn

from pytest_modelhooks._torch import (
    FAKE_TENSOR_LOGGER,
    fake_tensor_mode,
    rnn_flat_weights,
    set_rnn_flat_weights,
)
from pytest_modelhooks._tree import map_tensors, shapes_of, tensor_leaves
from pytest_modelhooks.errors import LayerError
from pytest_modelhooks.hooks.core import caller_level
from pytest_modelhooks.hooks.state import preserve_training_flags
from pytest_modelhooks.inputs import (
    check_devices,
    check_model,
    first_tensor,
    refuse_lazy,
    refuse_sharded,
    uninitialized_lazy,
)
from pytest_modelhooks.tracing.recorder import Recorder, inline_sequentials, layer_error, shortcut_forwards
from pytest_modelhooks.tracing.records import Trace
from pytest_modelhooks.tracing.state import python_state_kept

Engine = Literal["auto", "meta", "fake", "real"]


_ENGINES = ("auto", "meta", "fake", "real")


# torch warns of these only because the forward runs under no_grad, not because of the model:
# a reentrant ``torch.utils.checkpoint`` block sees inputs that need no gradient.
_NO_GRAD_WARNINGS = ("None of the inputs have requires_grad=True",)


@contextmanager
def no_grad_quietly() -> Iterator[None]:
    """``torch.no_grad()`` without the warnings that no_grad alone makes torch give (under a
    ``filterwarnings = error`` configuration they would fail the test). Other warnings pass."""
    with warnings.catch_warnings(), torch.no_grad():
        for message in _NO_GRAD_WARNINGS:
            warnings.filterwarnings("ignore", message=re.escape(message), category=UserWarning)
        yield


# Where torch keeps its Python meta kernels and decompositions: their checks are not always the
# real kernels' (grouped_mm's meta kernel demands bfloat16 where the CPU kernel takes float32).
_META_KERNEL_FILES = (
    "_meta_registrations.py",
    "_refs/",
    "_prims/",
    "_prims_common/",
    "_decomp/",
    "_subclasses/fake_",
)


def _raised_in_meta_kernel(error: BaseException) -> bool:
    traceback = error.__traceback__
    while traceback is not None:
        path = traceback.tb_frame.f_code.co_filename.replace("\\", "/")
        # the path inside the torch package: a user's own "_refs" folder is not torch's
        inside = path.rpartition("/torch/")[2] if "/torch/" in path else ""
        if inside.startswith(_META_KERNEL_FILES):
            return True
        traceback = traceback.tb_next
    return False


def is_engine_limitation(error: BaseException) -> bool:
    """True when an error says the meta/fake engine cannot run this model, or may not: it came
    out of torch's own meta kernels, whose checks can differ from the real ones. Then the next
    engine runs, and where the model is really broken the real forward says so in torch's
    usual words."""
    if isinstance(error, NotImplementedError) or _raised_in_meta_kernel(error):
        return True
    text = f"{type(error).__name__}: {error}".lower()
    markers = (
        "meta",
        "fake",
        "datadependent",
        "data-dependent",
        "data dependent",
        "dynamic_output_shape",
        "_local_scalar_dense",
    )
    return any(marker in text for marker in markers)


@contextmanager
def swapped_tensors(
    modules: Sequence[nn.Module],
    make: Callable[[torch.Tensor], torch.Tensor],
    stores: Callable[[nn.Module], list[dict[str, Any]]] | None = None,
) -> Iterator[None]:
    """Put a stand-in made by ``make`` in place of every parameter and buffer for the block
    (or of those in the ``stores`` of each module, when given), and the originals back
    afterwards, also on an exception.

    One stand-in per tensor object, so tied weights (an LM's shared embedding and head) stay
    tied. This is what ``torch.func.functional_call`` does, without its name bookkeeping,
    which costs more than the forward itself on models with 10,000s of modules.
    """
    made: dict[int, torch.Tensor] = {}
    swapped: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    # RNNs keep their own list of weight references, refreshed during the forward: put the
    # originals back too, or the model would keep meta tensors after the trace.
    flat_weights = [
        (module, rnn_flat_weights(module)) for module in modules if isinstance(module, nn.RNNBase)
    ]
    remember = swapped.append

    def swap(store: dict[str, Any]) -> None:
        for name, tensor in store.items():
            if tensor is None:
                continue
            stand_in = made.get(id(tensor))
            if stand_in is None:
                stand_in = made[id(tensor)] = make(tensor)
            remember((store, name, tensor))
            store[name] = stand_in

    try:
        for module in modules:
            if stores is not None:
                for store in stores(module):
                    swap(store)
            else:
                # most modules hold no buffers, many no parameters: test before calling
                if module._parameters:
                    swap(module._parameters)
                if module._buffers:
                    swap(module._buffers)
        yield
    finally:
        for store, name, tensor in reversed(swapped):
            store[name] = tensor
        for rnn, weights in flat_weights:
            set_rnn_flat_weights(rnn, weights)


_META = torch.device("meta")  # a device object: parsing the string costs ~0.4 us a tensor


def _to_meta(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(tensor, device=_META)


def _copy_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clone()


def _written_in_forward(module: nn.Module) -> list[dict[str, Any]]:
    """The tensors a real forward may write to, which it runs on copies of: every buffer (a
    running average some modules update in eval mode too, a cache) and the weight of an
    Embedding with ``max_norm`` (renormalised in place at each lookup). Buffers are small next
    to the weights; other weights are left in place (copying them would double the memory)
    and checked afterwards instead."""
    stores: list[dict[str, Any]] = [module._buffers] if module._buffers else []
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.max_norm is not None:
        stores.append(module._parameters)
    return stores


def _param_versions(named: Sequence[tuple[str, nn.Module]]) -> list[tuple[str, torch.Tensor, int]]:
    return [
        (f"{prefix}.{name}" if prefix else name, param, param._version)
        for prefix, module in named
        for name, param in module._parameters.items()
        if param is not None
    ]


def _warn_if_changed(versions: list[tuple[str, torch.Tensor, int]]) -> None:
    """Warn, naming them, of parameters whose version counter moved: the real forward changed
    them in place, and it could not run them on copies (see :func:`_written_in_forward`)."""
    changed = [name for name, param, version in versions if param._version != version]
    if changed:
        shown = ", ".join(changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        warnings.warn(
            f"the model's forward changed parameters in place ({shown}{more}) while its shapes "
            f"were traced on the real engine; the model keeps the changed values",
            stacklevel=caller_level(),
        )


def _engine_order(model: nn.Module, engine: str, inputs: Any = None, argument: str = "input") -> list[str]:
    if engine not in _ENGINES:
        raise ValueError(f"engine must be one of {', '.join(_ENGINES)}, got engine={engine!r}")
    weights = first_tensor(model)
    on_meta = weights is not None and weights.device.type == "meta"
    if any(tensor.is_nested for _, tensor in tensor_leaves(inputs)):
        # torch makes no meta or fake copies of nested tensors (jagged sizes are symbols)
        if engine not in ("auto", "real"):
            raise ValueError(
                f"engine={engine!r} cannot run a nested tensor {argument}: use engine='real' or 'auto'"
            )
        if on_meta:
            raise ValueError(
                f"a nested tensor {argument} runs only on the real engine, and its weights are on "
                f"the meta device"
            )
        return ["real"]
    if engine == "auto":
        return ["meta", "fake"] if on_meta else ["meta", "fake", "real"]
    if engine == "real" and on_meta:
        raise ValueError(
            f"engine='real' cannot run {type(model).__name__}: its weights are on the meta device"
        )
    return [engine]


@contextmanager
def _engine_inputs(
    modules: Sequence[nn.Module], engine: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Run the block with the model's tensors swapped for ``engine``; yield the inputs to use."""
    if engine == "real":
        with swapped_tensors(modules, _copy_of, _written_in_forward):
            yield args, kwargs
        return
    if engine == "meta":
        with swapped_tensors(modules, _to_meta):
            yield map_tensors(args, _to_meta), map_tensors(kwargs, _to_meta)
        return
    # torch logs every fake kernel failure at ERROR level; a failure here only moves the trace
    # on to the next engine (or becomes the LayerError), so keep it out of the user's output
    fake_log = logging.getLogger(FAKE_TENSOR_LOGGER)
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        with (
            fake_tensor_mode(allow_non_fake_inputs=True) as mode,
            swapped_tensors(modules, mode.from_tensor),
        ):
            yield map_tensors(args, mode.from_tensor), map_tensors(kwargs, mode.from_tensor)
    finally:
        fake_log.setLevel(level)


def trace_model(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    *,
    engine: str = "auto",
    count_flops: bool = False,
    argument: str = "input",
) -> Trace:
    """Run ``model(*args, **kwargs)`` once, in eval mode under ``no_grad``, and record every
    module call's input and output shapes. ``args`` is a tuple of the positional inputs; a
    lone tensor is taken as the one input.

    With ``engine="auto"`` the forward runs on meta stand-ins for the weights, then under
    ``FakeTensorMode``, then for real, moving on only when an engine cannot run the model
    (a missing meta kernel, data-dependent control flow). A failure inside a layer raises
    :class:`LayerError` naming it. The model ends with no hooks and its train/eval flags as they
    were, also when the forward raises.

    >>> trace = trace_model(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), (torch.zeros(3, 4),))
    >>> trace.engine, [call.name for call in trace.calls], trace.calls[-1].output_shapes
    ('meta', ['', '0', '1'], torch.Size([3, 8]))
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not ours
    model = check_model(model)
    if isinstance(args, torch.Tensor):  # trace_model(model, x): one input, not its rows
        args = (args,)
    elif not isinstance(args, (tuple, list)):
        raise TypeError(
            f"trace_model: args must be a tuple of the forward's positional inputs (or one tensor), "
            f"got a {type(args).__name__}; wrap a single input in a tuple: (input,)"
        )
    args = tuple(args)
    kwargs = dict(kwargs or {})
    check_devices(model, (args, kwargs), argument)
    engines = _engine_order(model, engine, (args, kwargs), argument)
    for position, engine_name in enumerate(engines):
        try:
            with gc_paused():
                return _trace_once(model, args, kwargs, engine_name, count_flops)
        except _EngineFailed as failed:
            is_last = position == len(engines) - 1
            if is_last or not is_engine_limitation(failed.error):
                raise failed.layer_error from None
    raise AssertionError("unreachable: every engine either returns or raises")


@contextmanager
def _attention_fastpath_off() -> Iterator[None]:
    """Turn off torch's fused inference path of ``nn.TransformerEncoderLayer`` and
    ``nn.MultiheadAttention`` for the trace. Under ``no_grad`` on a CPU or GPU it runs a whole
    layer as one kernel (its attention, linear and norm submodules never run, and no
    mult-adds are seen) and, given a padding mask, turns the batch into a nested tensor; on meta
    tensors it never runs. Off, every engine gives the same rows: the architecture, not the
    kernel choice of the moment."""
    mha = getattr(torch.backends, "mha", None)  # torch >= 2.2
    if mha is None:
        yield
        return
    was_enabled = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was_enabled)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: a trace allocates a few records per module call, and
    on a 20,000-module model the collector's repeated passes cost more than the hooks."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class _EngineFailed(Exception):
    def __init__(self, error: BaseException, layer_error: LayerError) -> None:
        super().__init__(str(error))
        self.error = error
        self.layer_error = layer_error


def _trace_once(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], engine: str, count_flops: bool
) -> Trace:
    # One walk gives both lists: the first path to each module is what named_modules() yields.
    paths = list(model.named_modules(remove_duplicate=False))
    named: list[tuple[str, nn.Module]] = []
    known: dict[int, tuple[str, int]] = {}  # also the set of modules seen
    for name, module in paths:
        key = id(module)
        if key not in known:
            known[key] = (name, name.count(".") + 1 if name else 0)
            named.append((name, module))
            if uninitialized_lazy(module):
                refuse_lazy(name, module)
    refuse_sharded(model, named)
    modules = [module for _, module in named]
    recorder = Recorder(known)
    trace = Trace(engine, named=named, paths=paths)
    versions = _param_versions(named) if engine == "real" else []
    try:
        with ExitStack() as stack:
            # entered first, left last: whatever the forward stored in attributes goes back
            stack.enter_context(python_state_kept(modules))
            stack.enter_context(preserve_training_flags(model, eval_mode=True, modules=modules))
            stack.enter_context(no_grad_quietly())
            stack.enter_context(_attention_fastpath_off())
            run_args, run_kwargs = stack.enter_context(_engine_inputs(modules, engine, args, kwargs))
            if engine == "meta" or count_flops:
                from pytest_modelhooks.tracing.dispatch import TraceMode

                sink = recorder.add_flops if count_flops else None
                stack.enter_context(TraceMode(fast_meta=engine == "meta", flops_sink=sink))
            # children answered by shape rules inside plain Sequentials need no stand-in
            ruled = stack.enter_context(
                inline_sequentials(modules, recorder, shape_rules=engine == "meta", count_flops=count_flops)
            )
            if engine == "meta":
                flops_sink = recorder.add_flops if count_flops else None
                stack.enter_context(shortcut_forwards(modules, flops_sink, skip=ruled))
            try:
                output = model(*run_args, **run_kwargs)
            except Exception as error:
                raise _EngineFailed(error, layer_error(recorder, model, error, args, kwargs)) from error
            trace.output_shapes = shapes_of(output)
            trace.counted_flops = count_flops
    finally:
        recorder.remove()
        _warn_if_changed(versions)
    trace.calls = recorder.calls
    return trace
