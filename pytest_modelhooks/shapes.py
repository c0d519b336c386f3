"""Shapes: dummy batches, the input a model expects, and the size of every layer's output.

Shapes are inferred without computing on (or copying) the real weights whenever the model
allows: the forward runs on ``meta`` stand-ins for the parameters and buffers, or under
``FakeTensorMode`` when a meta kernel is missing, and falls back to a real forward on a batch of
one only when the model's control flow depends on values. Every result says which engine ran.
"""

from __future__ import annotations

import gc
import inspect
import logging
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn, cast, overload

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from pytest_modelhooks._tree import format_shape, jsonable_shape, map_tensors, shapes_of, tensor_leaves
from pytest_modelhooks.hooks import (
    ModuleSpec,
    _caller_level,
    loaded_class,
    preserve_training_flags,
    select_modules,
)

__all__ = [
    "Call",
    "Engine",
    "InputSpec",
    "LayerError",
    "LayerSizes",
    "Trace",
    "dummy_batch",
    "dummy_eval",
    "in_channels",
    "input_spec",
    "make_input",
    "model_sizes",
    "num_features_model",
    "trace_dummy",
    "trace_model",
]

Engine = Literal["auto", "meta", "fake", "real"]
_ENGINES = ("auto", "meta", "fake", "real")

# --------------------------------------------------------------------------- the input a model expects

_CONV_RANK: dict[type[nn.Module], int] = {
    nn.Conv1d: 1,
    nn.Conv2d: 2,
    nn.Conv3d: 3,
    nn.ConvTranspose1d: 1,
    nn.ConvTranspose2d: 2,
    nn.ConvTranspose3d: 3,
    nn.BatchNorm2d: 2,
    nn.BatchNorm3d: 3,
}


@dataclass(frozen=True)
class InputSpec:
    """What the first layer that consumes the input expects.

    ``layout`` is ``"channels_first"`` (convolutions: ``(B, C, *spatial)``), ``"features_last"``
    (Linear, LayerNorm, attention: ``(B, *extra, F)``), ``"sequence"`` (RNNs and attention:
    ``(B, L, F)`` or ``(L, B, F)``) or ``"tokens"`` (Embedding: integer ids ``(B, *extra)``).
    """

    layer: str
    layer_type: str
    layout: str
    channels: int
    spatial_rank: int | None = None
    batch_first: bool = True
    default_size: tuple[int, ...] = ()


def _spec_for(name: str, module: nn.Module) -> InputSpec | None:
    kind = type(module).__name__
    for conv_type, rank in _CONV_RANK.items():
        if isinstance(module, conv_type):
            channels: Any = getattr(module, "in_channels", None) or getattr(module, "num_features", 0)
            return InputSpec(
                name,
                kind,
                "channels_first",
                int(channels),
                rank,
                True,
                (64,) * rank if rank < 3 else (16,) * 3,
            )
    if isinstance(module, nn.BatchNorm1d):
        return InputSpec(name, kind, "channels_first", module.num_features, None, True, ())
    if isinstance(module, nn.Linear):
        return InputSpec(name, kind, "features_last", module.in_features)
    if isinstance(module, nn.LayerNorm):
        return InputSpec(name, kind, "features_last", int(module.normalized_shape[-1]))
    if isinstance(module, nn.RNNBase):
        return InputSpec(name, kind, "sequence", module.input_size, 1, module.batch_first, (8,))
    if isinstance(module, nn.MultiheadAttention):
        return InputSpec(name, kind, "sequence", module.embed_dim, 1, module.batch_first, (8,))
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return InputSpec(name, kind, "tokens", module.num_embeddings, None, True, (8,))
    return None


_GIVE_INPUT = (
    "give the input explicitly (model_sizes(input=...), model_summary(input_size=... or input_data=...))"
)


def input_spec(model: nn.Module) -> InputSpec:
    """Describe the input ``model`` expects, read from its first leaf layer with parameters (in
    registration order).

    >>> input_spec(nn.Sequential(nn.Conv2d(3, 8, 3))).channels
    3
    """
    model = _check_model(model)
    for name, module in model.named_modules():
        if _uninitialized_lazy(module):
            _refuse_lazy(name, module)  # its sizes are not known yet (in_channels=0)
        spec = _spec_for(name, module)
        if spec is not None:
            return spec
        is_leaf = next(module.children(), None) is None
        # A container's loose parameters (a learned scale) do not say what the input is; a leaf
        # layer with parameters of an unknown kind is the first consumer and stops the search.
        if is_leaf and next(module.parameters(recurse=False), None) is not None:
            raise ValueError(
                f"cannot tell the input of {type(model).__name__}: its first layer with parameters, "
                f"{_layer_label(name, module)}, is not a convolution, Linear, norm, RNN, attention or "
                f"Embedding layer; {_GIVE_INPUT}"
            )
    raise ValueError(
        f"cannot tell the input of {type(model).__name__}: it has no layer with parameters; {_GIVE_INPUT}"
    )


def in_channels(model: nn.Module) -> int:
    """The number of input channels (features) ``model`` expects, from the first layer that
    consumes the input: Conv1d/2d/3d (grouped convolutions included), ConvTranspose, BatchNorm,
    Linear, LayerNorm, LSTM/GRU/RNN, MultiheadAttention. For an Embedding first layer the input
    is integer ids and the vocabulary size is returned.

    >>> in_channels(nn.Sequential(nn.Conv2d(6, 12, 3, groups=3), nn.ReLU()))
    6
    """
    return input_spec(model).channels


def _check_model(model: object, argument: str = "model") -> nn.Module:
    """``model`` itself, or the module a ``torch.compile`` wrapper holds: shapes and summaries
    trace the original eagerly (compiling would cost seconds and hide the submodules)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{argument} must be an nn.Module, got {type(model).__name__}")
    original = getattr(model, "_orig_mod", None)
    if isinstance(original, nn.Module) and type(model).__name__ == "OptimizedModule":
        return original
    return model


def _first_tensor(model: nn.Module) -> torch.Tensor | None:
    tensor: torch.Tensor | None = next(model.parameters(), None)
    return tensor if tensor is not None else next(model.buffers(), None)


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    tensor = _first_tensor(model)
    if tensor is None:
        return torch.device("cpu"), torch.get_default_dtype()
    dtype = tensor.dtype if tensor.is_floating_point() else torch.get_default_dtype()
    return tensor.device, dtype


def _resolve_size(spec: InputSpec, size: Sequence[int] | None) -> tuple[int, ...]:
    if size is None:
        return spec.default_size
    if isinstance(size, int):
        size = (size,) * (spec.spatial_rank or 1)
    if not isinstance(size, Sequence) or not all(isinstance(dim, int) and dim > 0 for dim in size):
        raise ValueError(f"size must be a sequence of positive ints, got size={size!r}")
    size = tuple(size)
    if spec.spatial_rank is not None and len(size) != spec.spatial_rank:
        need = {"channels_first": "spatial", "sequence": "sequence"}.get(spec.layout, "")
        raise ValueError(
            f"size={size!r} has {len(size)} dimension(s) but the first layer '{spec.layer}' "
            f"({spec.layer_type}) needs {spec.spatial_rank} {need} dimension(s)"
        )
    return size


def dummy_batch(model: nn.Module, size: Sequence[int] | None = None) -> torch.Tensor:
    """A batch of one that ``model`` accepts, on the model's device and floating dtype.

    ``size`` is the spatial size for convolutions (default ``(64, 64)`` for 2-d, ``(64,)`` for
    1-d, ``(16, 16, 16)`` for 3-d), the sequence length for RNNs, attention and embeddings
    (default ``(8,)``), and extra leading dims for Linear (default none). Values are drawn from
    a private generator, so the global RNG is untouched and the batch is the same every time.

    >>> dummy_batch(nn.Conv2d(3, 8, 3), (32, 32)).shape
    torch.Size([1, 3, 32, 32])
    """
    return _batch_for(model, input_spec(model), size)


def _batch_for(model: nn.Module, spec: InputSpec, size: Sequence[int] | None) -> torch.Tensor:
    dims = _resolve_size(spec, size)
    device, dtype = _model_device_dtype(model)
    if spec.layout == "channels_first":
        shape: tuple[int, ...] = (1, spec.channels, *dims)
    elif spec.layout == "features_last":
        shape = (1, *dims, spec.channels)
    elif spec.layout == "sequence":
        shape = (1, dims[0], spec.channels) if spec.batch_first else (dims[0], 1, spec.channels)
    else:
        shape = (1, *dims)
    return make_input(shape, device, dtype, token_range=spec.channels if spec.layout == "tokens" else None)


def make_input(
    shape: Sequence[int], device: torch.device, dtype: torch.dtype, *, token_range: int | None = None
) -> torch.Tensor:
    """A tensor of ``shape`` with reproducible values (uniform in [-1, 1), or integer ids below
    ``token_range``), drawn from a private generator so the global RNG is untouched.

    >>> make_input((1, 4), torch.device("cpu"), torch.int64, token_range=10).shape
    torch.Size([1, 4])
    """
    shape = tuple(shape)
    if device.type == "meta":
        return torch.empty(shape, device=device, dtype=torch.long if token_range else dtype)
    generator = torch.Generator().manual_seed(0)
    if token_range:
        return torch.randint(0, token_range, shape, generator=generator).to(device)
    return (torch.rand(shape, generator=generator) * 2 - 1).to(device=device, dtype=dtype)


def dummy_eval(model: nn.Module, size: Sequence[int] | None = None) -> Any:
    """Run ``model`` in eval mode on :func:`dummy_batch` under ``no_grad`` and return its output;
    every module's train/eval flag is restored afterwards.

    When that batch fails, the forward is traced on meta stand-ins to name the layer (a
    :class:`LayerError`), or to find the layer that really reads the input, as
    :func:`model_sizes` does (a head declared before its backbone): the model then runs on a
    batch for that layer.

    >>> dummy_eval(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Dropout()), (10, 10)).shape
    torch.Size([1, 8, 8, 8])
    """
    __tracebackhide__ = True
    if _takes_no_input(model, size):
        with preserve_training_flags(model, eval_mode=True), _no_grad_quietly():
            return model()
    spec = input_spec(model)
    with preserve_training_flags(model, eval_mode=True), _no_grad_quietly():
        try:
            return model(_batch_for(model, spec, size))
        except Exception as error:
            failed = error
    if _sharded(model) is not None:
        raise failed  # no trace can run on a sharded model to name the layer
    _, fitting = _fitting_dummy(model, size)  # raises a LayerError naming the layer
    if fitting.layer == spec.layer:
        raise failed  # the trace ran where the real forward did not: the model's own failure
    with preserve_training_flags(model, eval_mode=True), _no_grad_quietly():
        return model(_batch_for(model, fitting, size))


# torch warns of these only because the forward runs under no_grad, not because of the model:
# a reentrant ``torch.utils.checkpoint`` block sees inputs that need no gradient.
_NO_GRAD_WARNINGS = ("None of the inputs have requires_grad=True",)


@contextmanager
def _no_grad_quietly() -> Iterator[None]:
    """``torch.no_grad()`` without the warnings that no_grad alone makes torch give (under a
    ``filterwarnings = error`` configuration they would fail the test). Other warnings pass."""
    with warnings.catch_warnings(), torch.no_grad():
        for message in _NO_GRAD_WARNINGS:
            warnings.filterwarnings("ignore", message=re.escape(message), category=UserWarning)
        yield


def trace_dummy(
    model: nn.Module,
    size: Sequence[int] | None = None,
    *,
    engine: str = "auto",
    count_flops: bool = False,
    kwargs: Mapping[str, Any] | None = None,
) -> Trace:
    """:func:`trace_model` on :func:`dummy_batch` (and ``kwargs``, the forward's keyword inputs;
    when they name the forward's first parameter, they are the whole input).

    The batch is made for the first layer with parameters in *registration* order, which is not
    always the first to run (a head declared before the backbone). When the forward then fails
    before that layer ran, at another layer that reads inputs (a convolution, Linear,
    Embedding...), it is retried once with a batch made for that layer, and kept only if the
    whole forward succeeds. If not, the first error is raised, saying which layer the batch was
    made for. A failure after that layer ran is the model's own, raised as it is.

    >>> trace = trace_dummy(nn.Sequential(nn.Linear(4, 8), nn.ReLU()))
    >>> [(call.name, tuple(call.output_shapes)) for call in trace.calls]
    [('', (1, 8)), ('0', (1, 8)), ('1', (1, 8))]
    """
    __tracebackhide__ = True
    kwargs = dict(kwargs or {})
    if _takes_no_input(model, size) or (kwargs and _fills_first_input(model, kwargs)):
        if kwargs and size is not None:
            raise ValueError(
                f"size={tuple(size)!r} was given, but the keyword inputs fill "
                f"{type(model).__name__}.forward's first input; pass one or the other"
            )
        return trace_model(model, (), kwargs, engine=engine, count_flops=count_flops)
    return _fitting_dummy(model, size, engine=engine, count_flops=count_flops, kwargs=kwargs)[0]


def _takes_no_input(model: nn.Module, size: Sequence[int] | None) -> bool:
    """Whether ``model.forward`` takes no argument at all (a generator drawing its own noise,
    a decoder of learned queries): its dummy input is no input. A ``size`` for it is an error."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a builtin or an odd callable: assume it takes an input
        return False
    if parameters:
        return False
    if size is not None:
        raise ValueError(
            f"size={tuple(size)!r} was given, but {type(model).__name__}.forward() takes no input"
        )
    return True


def _fitting_dummy(
    model: nn.Module,
    size: Sequence[int] | None,
    *,
    engine: str = "auto",
    count_flops: bool = False,
    kwargs: dict[str, Any] | None = None,
) -> tuple[Trace, InputSpec]:
    """:func:`trace_dummy`, and the layer whose batch ran."""
    __tracebackhide__ = True
    spec = input_spec(model)
    try:
        batch = _batch_for(model, spec, size)
        return trace_model(model, (batch,), kwargs, engine=engine, count_flops=count_flops), spec
    except LayerError as error:
        if spec.layer in error.finished:
            raise  # the batch fit the layer it was made for: the failure is the model's own
        first_error = error
    retry = _spec_of_layer(model, first_error.layer)
    if retry is not None and retry.layer != spec.layer:
        try:
            batch = _batch_for(model, retry, size)
            return trace_model(model, (batch,), kwargs, engine=engine, count_flops=count_flops), retry
        except (LayerError, ValueError):
            pass  # the first error says more: it is about the model as the user wrote it
    label = f"'{spec.layer}' ({spec.layer_type})" if spec.layer else spec.layer_type
    raise LayerError(
        f"{first_error}; the input was made for layer {label}, the first layer with parameters "
        f"(in registration order): if another layer reads the input, {_GIVE_INPUT}",
        first_error.layer,
        first_error.layer_type,
        first_error.input_shapes,
        first_error.original,
    ) from None


def _spec_of_layer(model: nn.Module, name: str) -> InputSpec | None:
    if not name:  # the model's own forward failed: no layer to make a batch for
        return None
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return _spec_for(name, module)


# --------------------------------------------------------------------------- tracing a forward


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


class LayerError(RuntimeError):
    """A forward failed inside a layer; names the layer and the shapes it received.

    ``.original`` is the exception the layer raised. It is not chained for display: its
    traceback runs through torch's kernels and hooks and would bury the one line that matters.
    ``.finished`` names the layers that returned before the failure.

    >>> try:
    ...     model_sizes(nn.Sequential(nn.Linear(4, 8), nn.Linear(9, 2)))
    ... except LayerError as error:
    ...     print(str(error).split(": RuntimeError")[0])
    ...     print(error.layer, error.finished, type(error.original).__name__)
    layer '1' (Linear, in_features=9) got input (1, 8)
    1 ('0',) RuntimeError
    """

    def __init__(
        self,
        message: str,
        layer: str,
        layer_type: str,
        input_shapes: Any,
        original: BaseException | None = None,
        finished: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.layer = layer
        self.layer_type = layer_type
        self.input_shapes = input_shapes
        self.original = original
        self.finished = finished


_KEY_ATTRIBUTES = ("in_channels", "in_features", "num_features", "input_size", "embed_dim", "num_embeddings")


def _layer_label(name: str, module: nn.Module) -> str:
    details = [
        f"{attr}={getattr(module, attr)}"
        for attr in _KEY_ATTRIBUTES
        if isinstance(getattr(module, attr, None), int)
    ]
    inside = ", ".join([type(module).__name__, *details[:1]])
    return f"layer '{name}' ({inside})" if name else f"model {type(module).__name__}"


class _Recorder:
    """Records every call of ``model``'s modules: order, input and output shapes, and which
    call failed.

    It uses torch's *global* module hooks (two registrations in all) and keeps only the calls of
    ``model``'s own modules: registering two handles on each of 20,000 modules costs more than
    the forward of a deep MLP, and the model's own hook dicts are never touched.
    """

    def __init__(self, known: dict[int, tuple[str, int]]) -> None:
        self.calls: list[Call] = []
        self.stack: list[Call] = []  # the calls running now, outermost first
        self.counts: dict[int, int] = {}
        self.known = known  # id(module) -> (qualified name, depth) for the model's modules
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self.handles = [register_module_forward_pre_hook(self._pre)]
        try:
            try:
                self.handles.append(register_module_forward_hook(self._post, with_kwargs=True))
            except TypeError:  # torch < 2.2: global hooks see no keyword arguments
                self.handles.append(register_module_forward_hook(self._post_without_kwargs))
        except BaseException:
            self.remove()
            raise

    def _pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        key = id(module)
        known = self.known.get(key)
        if known is None:  # a module of another model, or not registered in this one
            return
        count = self.counts[key] = self.counts.get(key, 0) + 1
        call = Call(known[0], module, known[1], len(self.calls), count, pending=args)
        self.calls.append(call)
        self.stack.append(call)

    def _post_without_kwargs(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._post(module, args, {}, output)

    def _post(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        # Not called when the forward raised: the failing calls stay unfinished, and the last
        # unfinished call in pre-order is the innermost layer that failed.
        stack = self.stack
        if stack and stack[-1].module is module:
            call = stack.pop()
        else:
            if id(module) not in self.known:
                return
            position = len(stack) - 1
            while position >= 0 and stack[position].module is not module:
                position -= 1  # calls above it raised and the exception was caught
            if position < 0:
                return
            call = stack[position]
            del stack[position:]
        call.pending = None
        try:
            call.input_shapes = (
                (args[0].shape,)
                if not kwargs and len(args) == 1 and type(args[0]) is torch.Tensor
                else _call_shapes(args, kwargs)
            )
            call.output_shapes = output.shape if type(output) is torch.Tensor else shapes_of(output)
        except RuntimeError:  # a nested tensor has no single size (checked only when one fails)
            call.input_shapes = _call_shapes(args, kwargs)
            call.output_shapes = shapes_of(output)
        call.finished = True
        if stack:
            stack[-1].flops += call.flops

    def add_flops(self, flops: int) -> None:
        """Attribute ``flops`` to the innermost running call."""
        if self.stack:
            self.stack[-1].flops += flops

    def remove(self) -> None:
        from torch.nn.modules import module as torch_module

        for handle in self.handles:
            handle.remove()
            # torch's handle forgets the global hook's with_kwargs flag; left behind, it makes
            # every later torch.compile'd module warn about global hooks, for the whole process
            getattr(torch_module, "_global_forward_hooks_with_kwargs", {}).pop(handle.id, None)
        self.handles.clear()

    def failing_call(self) -> Call | None:
        unfinished = [call for call in self.calls if not call.finished]
        if not unfinished:
            return None
        call = unfinished[-1]
        call.input_shapes = _call_shapes(call.pending or (), {})
        return call


def _call_shapes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor) and not args[0].is_nested:
        return (args[0].shape,)  # the common case, without the structure walk
    shapes = shapes_of(args)
    if kwargs:
        shapes = (*shapes, {key: shapes_of(value) for key, value in kwargs.items()})
    return shapes


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


def _is_engine_limitation(error: BaseException) -> bool:
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
def _swapped_tensors(
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
        (module, list(module._flat_weights)) for module in modules if isinstance(module, nn.RNNBase)
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
            rnn._flat_weights = weights


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
            stacklevel=_caller_level(),
        )


def _input_devices(args: Any) -> set[torch.device]:
    return {tensor.device for _, tensor in tensor_leaves(args)}


def _check_devices(model: nn.Module, args: Any, argument: str) -> None:
    weights = _first_tensor(model)
    if weights is None or weights.device.type == "meta":
        return
    for device in _input_devices(args):
        if device.type != "meta" and device != weights.device:
            raise ValueError(
                f"{argument} is on {device} but the weights of {type(model).__name__} are on "
                f"{weights.device}; move one of them"
            )


def _engine_order(model: nn.Module, engine: str, inputs: Any = None, argument: str = "input") -> list[str]:
    if engine not in _ENGINES:
        raise ValueError(f"engine must be one of {', '.join(_ENGINES)}, got engine={engine!r}")
    weights = _first_tensor(model)
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
        with _swapped_tensors(modules, _copy_of, _written_in_forward):
            yield args, kwargs
        return
    if engine == "meta":
        with _swapped_tensors(modules, _to_meta):
            yield map_tensors(args, _to_meta), map_tensors(kwargs, _to_meta)
        return
    from torch._subclasses.fake_tensor import FakeTensorMode

    # torch logs every fake kernel failure at ERROR level; a failure here only moves the trace
    # on to the next engine (or becomes the LayerError), so keep it out of the user's output
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, _swapped_tensors(modules, mode.from_tensor):
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
    module call's input and output shapes.

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
    model = _check_model(model)
    kwargs = dict(kwargs or {})
    _check_devices(model, (args, kwargs), argument)
    engines = _engine_order(model, engine, (args, kwargs), argument)
    for position, engine_name in enumerate(engines):
        try:
            with gc_paused():
                return _trace_once(model, args, kwargs, engine_name, count_flops)
        except _EngineFailed as failed:
            is_last = position == len(engines) - 1
            if is_last or not _is_engine_limitation(failed.error):
                raise failed.layer_error from None
    raise AssertionError("unreachable: every engine either returns or raises")


#: Whether modules carry ``Module.compile()``'s slot (torch >= 2.2): read only where they do.
_COMPILE_CALL = "_compiled_call_impl" in vars(nn.Module())


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


def _uninitialized_lazy(module: nn.Module) -> bool:
    lazy: Any = module  # the mixin's methods are typed for a protocol, not for nn.Module
    return isinstance(module, LazyModuleMixin) and bool(lazy.has_uninitialized_params())


def _refuse_lazy(name: str, module: nn.Module) -> NoReturn:
    where = f"layer '{name}' ({type(module).__name__})" if name else f"model {type(module).__name__}"
    raise ValueError(
        f"{where} has uninitialized parameters: a lazy module takes its sizes from its first "
        f"forward, which changes the model for good (it materializes the parameters and changes "
        f"the module's class). Run the model once on a real batch first"
    )


def _sharded(model: nn.Module, named: Sequence[tuple[str, nn.Module]] | None = None) -> str | None:
    """Why ``model`` is sharded (FSDP2's ``fully_shard``, or DTensor parameters from tensor
    parallelism), or None. FSDP2 is found by its module class, since a forward that failed
    leaves its parameters unsharded, as plain tensors. ``named``: ``model.named_modules()``,
    when the caller has walked it already (a second walk of 20,000 modules costs ~25 ms)."""
    fsdp = loaded_class("torch.distributed.fsdp", "FSDPModule")
    dtensor = loaded_class("torch.distributed.tensor", "DTensor")
    if fsdp is None and dtensor is None:
        return None  # never imported: nothing is sharded
    if named is None:
        named = list(model.named_modules())
    if fsdp is not None and any(issubclass(cls, fsdp) for cls in {type(module) for _, module in named}):
        name = next(name for name, module in named if isinstance(module, fsdp))
        return f"{'the model' if not name else repr(name)} is sharded by fully_shard (FSDP2)"
    if dtensor is not None:
        for prefix, module in named:
            for name, param in module._parameters.items():
                if param is not None and isinstance(param, dtensor):
                    qualified = f"{prefix}.{name}" if prefix else name
                    return f"parameter {qualified!r} is a DTensor (tensor parallelism)"
    return None


def _refuse_sharded(model: nn.Module, named: Sequence[tuple[str, nn.Module]]) -> None:
    """Refuse a sharded model before anything runs: FSDP2's hooks all-gather and swap
    parameters in the forward, and a trace that swaps them too leaves the sharding state
    half-initialised."""
    reason = _sharded(model, named)
    if reason is not None:
        raise TypeError(
            f"cannot trace {type(model).__name__}: {reason}. Shapes and summaries trace the "
            f"unsharded model: run them before sharding it (built under torch.device('meta') "
            f"it costs no memory)"
        )


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
            if _uninitialized_lazy(module):
                _refuse_lazy(name, module)
    _refuse_sharded(model, named)
    modules = [module for _, module in named]
    recorder = _Recorder(known)
    trace = Trace(engine, named=named, paths=paths)
    versions = _param_versions(named) if engine == "real" else []
    try:
        with ExitStack() as stack:
            stack.enter_context(preserve_training_flags(model, eval_mode=True, modules=modules))
            stack.enter_context(_no_grad_quietly())
            stack.enter_context(_attention_fastpath_off())
            run_args, run_kwargs = stack.enter_context(_engine_inputs(modules, engine, args, kwargs))
            if engine == "meta" or count_flops:
                from pytest_modelhooks._dispatch import TraceMode

                sink = recorder.add_flops if count_flops else None
                stack.enter_context(TraceMode(fast_meta=engine == "meta", flops_sink=sink))
            # children answered by shape rules inside plain Sequentials need no stand-in
            ruled = stack.enter_context(
                _inline_sequentials(modules, recorder, shape_rules=engine == "meta", count_flops=count_flops)
            )
            if engine == "meta":
                flops_sink = recorder.add_flops if count_flops else None
                stack.enter_context(_shortcut_forwards(modules, flops_sink, skip=ruled))
            try:
                output = model(*run_args, **run_kwargs)
            except Exception as error:
                raise _EngineFailed(error, _layer_error(recorder, model, error, args, kwargs)) from error
            trace.output_shapes = shapes_of(output)
            trace.counted_flops = count_flops
    finally:
        recorder.remove()
        _warn_if_changed(versions)
    trace.calls = recorder.calls
    return trace


@contextmanager
def _shortcut_forwards(
    modules: Sequence[nn.Module], flops_sink: Callable[[int], None] | None, skip: set[int]
) -> Iterator[None]:
    """Give the common leaf modules (but those in ``skip``) a stand-in ``forward`` on the
    instance for the block (see :func:`~pytest_modelhooks._dispatch.module_shortcut`), and
    always take it away again."""
    from pytest_modelhooks._dispatch import module_shortcut

    patched: list[nn.Module] = []
    try:
        for module in modules:
            if id(module) in skip:
                continue
            forward = module_shortcut(module, flops_sink)
            if forward is not None:
                # the instance dict, not setattr: nn.Module.__setattr__ costs ~2 us a call
                module.__dict__["forward"] = forward
                patched.append(module)
        yield
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)


def _meta_tensor(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    from pytest_modelhooks._dispatch import _no_python_dispatch

    with _no_python_dispatch():
        return torch.empty(shape, dtype=dtype, device="meta")


def _plain_call(cls: type[nn.Module]) -> bool:
    return (
        cls.__call__ is nn.Module.__call__
        and getattr(cls, "_wrapped_call_impl", None) is nn.Module._wrapped_call_impl
        and getattr(cls, "_call_impl", None) is nn.Module._call_impl
    )


@contextmanager
def _inline_sequentials(
    modules: Sequence[nn.Module], recorder: _Recorder, *, shape_rules: bool, count_flops: bool
) -> Iterator[set[int]]:
    """Let each plain ``nn.Sequential`` record its children's calls itself, for the block.

    A call through ``nn.Module.__call__`` with global hooks installed takes torch's slow path
    (~5 us a module before the hooks run). When the recorder's hooks are the only ones that
    would see a child's call, torch's own fast path would run just ``child.forward``, so
    calling the recorder and ``forward`` directly records exactly what the hooks would. Any
    other hook (the child's own, another global one), a compiled child, a class with its own
    ``__call__`` or JIT tracing takes the ordinary call.

    With ``shape_rules`` (the meta engine), children that have a
    :func:`~pytest_modelhooks._dispatch.class_shape_rule` are answered from the shape and dtype of
    their input alone, and a run of them builds no tensor in between; their calls are recorded
    directly. Yields the ids of those children: they need no stand-in ``forward``.
    """
    from torch.nn.modules import module as torch_module

    from pytest_modelhooks._dispatch import ShapeRule, _plain_meta, class_shape_rule, own_forward

    patched: list[nn.Module] = []
    plain: dict[type[nn.Module], bool] = {}

    def only_ours() -> bool:
        return (
            len(torch_module._global_forward_pre_hooks) == 1
            and len(torch_module._global_forward_hooks) == 1
            and not torch_module._global_backward_hooks
            and not torch_module._global_backward_pre_hooks
            and not torch._C._get_tracing_state()
        )

    rules: dict[int, ShapeRule] = {}
    class_rules: dict[type[nn.Module], ShapeRule | None] = {}
    known, counts, calls = recorder.known, recorder.counts, recorder.calls
    add_call = calls.append

    def inline(sequential: nn.Sequential) -> Callable[[Any], Any]:
        def forward(input: Any) -> Any:
            if not only_ours():
                return nn.Sequential.forward(sequential, input)  # type: ignore[no-untyped-call]
            # Over a run of children with shape rules, the value is only (shape, dtype):
            # ``virtual``; it becomes a meta tensor again where a child needs one.
            virtual = False
            shape, dtype = torch.Size(), torch.float32
            flops_total = 0
            for child in sequential._modules.values():
                # the hot path first: a hook-free child with a shape rule (its class's call
                # was checked plain when the rule was taken)
                rule = rules.get(id(child))
                if (
                    rule is not None
                    and not (
                        child._forward_hooks
                        or child._forward_pre_hooks
                        or child._backward_hooks
                        or child._backward_pre_hooks
                        or (_COMPILE_CALL and child._compiled_call_impl is not None)
                    )
                    and (virtual or _plain_meta(input))
                ):
                    if not virtual:
                        shape, dtype = input.shape, input.dtype
                    answered = rule(child, shape, dtype)
                    if answered is not None:
                        out_shape, flops, returns_input = answered
                        # what recorder.record does, inline: this runs once a layer
                        key = id(child)
                        name, depth = known[key]
                        count = counts[key] = counts.get(key, 0) + 1
                        if not count_flops:
                            flops = 0
                        call = Call(name, child, depth, len(calls), count, (shape,), out_shape, True, flops)
                        add_call(call)
                        flops_total += flops
                        # a module that returns its input keeps the real tensor, if there is one
                        virtual = virtual or not returns_input
                        shape = out_shape
                        continue
                cls = type(child)
                is_plain = plain.get(cls)
                if is_plain is None:
                    is_plain = plain[cls] = _plain_call(cls)
                if virtual:
                    input, virtual = _meta_tensor(shape, dtype), False
                if (
                    not is_plain
                    or (_COMPILE_CALL and child._compiled_call_impl is not None)
                    or child._forward_hooks
                    or child._forward_pre_hooks
                    or child._backward_hooks
                    or child._backward_pre_hooks
                ):
                    input = child(input)
                    continue
                args = (input,)
                recorder._pre(child, args)
                input = child.forward(input)
                recorder._post(child, args, {}, input)
            if flops_total and recorder.stack:
                recorder.stack[-1].flops += flops_total  # the Sequential's own call
            return _meta_tensor(shape, dtype) if virtual else input

        return forward

    try:
        for module in modules:
            cls = type(module)
            if (
                # getattr with a default: a scripted module's class raises on .forward
                getattr(cls, "forward", None) is nn.Sequential.forward
                and getattr(cls, "__iter__", None) is nn.Sequential.__iter__
                and "forward" not in module.__dict__
            ):
                module.__dict__["forward"] = inline(module)  # type: ignore[arg-type]
                patched.append(module)
                if shape_rules:
                    for child in module._modules.values():
                        if child is None:
                            continue
                        kind = type(child)
                        if kind in class_rules:
                            rule = class_rules[kind]
                        else:  # once per class: the call must be torch's own, too
                            rule = class_rules[kind] = class_shape_rule(kind) if _plain_call(kind) else None
                        if rule is not None and id(child) in known and not own_forward(child):
                            rules[id(child)] = rule
        yield set(rules)
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)


def _layer_error(
    recorder: _Recorder, model: nn.Module, error: BaseException, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> LayerError:
    call = recorder.failing_call()
    if call is not None and call.module is model and call.call_number == 1:
        # the recorder's pre-hook sees positional inputs only; the model's own are known
        call.input_shapes = _call_shapes(args, kwargs)
    if call is None:
        return LayerError(
            f"{type(model).__name__} failed before any layer ran: {error}",
            "",
            type(model).__name__,
            None,
            error,
        )
    shapes = call.input_shapes
    shown = (
        format_shape(shapes[0]) if isinstance(shapes, tuple) and len(shapes) == 1 else format_shape(shapes)
    )
    message = f"{_layer_label(call.name, call.module)} got input {shown}: {type(error).__name__}: {error}"
    finished = [done for done in recorder.calls if done.finished and done.name]
    if not call.name and finished:
        last = finished[-1]
        message += f" (after layer '{last.name}' returned {format_shape(last.output_shapes)})"
    names = tuple(done.name for done in finished)
    return LayerError(message, call.name, type(call.module).__name__, shapes, error, names)


# --------------------------------------------------------------------------- model_sizes


def is_input_data(value: Any) -> bool:
    """Whether a size argument was given data instead: a tensor, or a tuple, list or dict holding
    one (a shape never holds a tensor), so ``model_sizes(model, x)`` means ``input=x``."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, Mapping):
        return any(isinstance(item, torch.Tensor) for item in value.values())
    return isinstance(value, (tuple, list)) and any(isinstance(item, torch.Tensor) for item in value)


def _normalise_input(
    input: Any, argument: str = "input", model: nn.Module | None = None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(input, torch.Tensor):
        return (input,), {}
    if isinstance(input, Mapping):
        if model is not None and _is_one_batch_dict(model, input, argument):
            return (input,), {}
        return (), dict(input)
    if isinstance(input, (tuple, list)):
        return tuple(input), {}
    raise TypeError(
        f"{argument} must be a tensor, a tuple of positional inputs or a dict of keyword inputs, "
        f"got {type(input).__name__}"
    )


def _is_one_batch_dict(model: nn.Module, input: Mapping[str, Any], argument: str) -> bool:
    """Whether a dict given as the input is one positional input (``forward(self, batch)``
    reading ``batch["image"]``) rather than keyword inputs: none of its keys is a parameter
    of a forward that takes no ``**kwargs``. Some keys parameters and some not: an error
    naming them, before anything runs."""
    parameters = _forward_parameters(model)
    if parameters is None:
        return False  # it takes any keyword (or cannot be read): keyword inputs, as given
    unknown = [key for key in input if key not in _keyword_names(parameters)]
    if not unknown:
        return False
    first = next(iter(parameters.values()), None)
    takes_one = first is not None and first.kind in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL,
    )
    if len(unknown) == len(input) and takes_one:
        return True
    raise TypeError(
        f"{argument}: a dict is the forward's keyword inputs, and {', '.join(map(repr, unknown))} "
        f"is not a parameter of {type(model).__name__}.forward{_bare_signature(parameters)}; to pass "
        f"the dict itself as the first input, wrap it in a tuple: {argument}=(batch,)"
    )


def _keyword_names(parameters: Mapping[str, inspect.Parameter]) -> set[str]:
    """The parameters a call can name."""
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {name for name, parameter in parameters.items() if parameter.kind in keyword}


def _bare_signature(parameters: Mapping[str, inspect.Parameter]) -> inspect.Signature:
    """A signature with the parameters' names alone: annotations and defaults make it unreadable."""
    empty = inspect.Parameter.empty
    return inspect.Signature(
        [parameter.replace(annotation=empty, default=empty) for parameter in parameters.values()]
    )


def _forward_parameters(model: nn.Module) -> dict[str, inspect.Parameter] | None:
    """``model.forward``'s parameters, or None where they cannot be told (a builtin, an odd
    callable) or where it takes any keyword (``**kwargs``)."""
    try:
        parameters = dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return None
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
        return None
    return parameters


def with_forward_kwargs(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    forward_kwargs: Mapping[str, Any],
    caller: str,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The input with ``forward_kwargs`` (the keyword arguments given to ``caller`` that are not
    its own options, passed on to the forward as torchinfo does) added to its keyword inputs.
    A name the forward does not take is refused before anything runs: a misspelt option
    (``dept=2``) would otherwise fail deep inside the model's forward."""
    if not forward_kwargs:
        return args, kwargs
    twice = sorted(set(kwargs) & set(forward_kwargs))
    if twice:
        raise ValueError(f"{caller}(): {', '.join(map(repr, twice))} given in the input and as a keyword")
    parameters = _forward_parameters(model)
    if parameters is not None:
        unknown = [name for name in forward_kwargs if name not in _keyword_names(parameters)]
        if unknown:
            raise TypeError(
                f"{caller}() got an unexpected keyword argument {unknown[0]!r}: it is neither one of "
                f"{caller}()'s options nor a parameter of {type(model).__name__}.forward"
                f"{_bare_signature(parameters)}"
            )
    return args, {**kwargs, **forward_kwargs}


def _fills_first_input(model: nn.Module, forward_kwargs: Mapping[str, Any]) -> bool:
    """Whether ``forward_kwargs`` name the forward's first parameter, the one a dummy batch
    would fill: then they are the whole input, and no dummy batch is made."""
    try:
        first = next(iter(inspect.signature(model.forward).parameters.values()), None)
    except (TypeError, ValueError):
        return False
    keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return first is not None and first.kind is keyword and first.name in forward_kwargs


class LayerSizes(Sequence[Any]):
    """The output size of each selected layer, by position (as fastai's list) and by name.

    ``sizes[i]`` and ``sizes["encoder.stage2"]`` give the output of the layer's last call: a
    ``torch.Size`` (batch dimension included), or the same structure of sizes for tuple/dict
    outputs, or ``None`` for a layer that never ran. ``sizes.calls(name)`` lists every call.

    >>> sizes = model_sizes(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), input=torch.zeros(2, 4))
    >>> sizes.names, sizes[-1], sizes["0"], sizes.calls("1")
    (('0', '1'), torch.Size([2, 8]), torch.Size([2, 8]), [torch.Size([2, 8])])
    """

    def __init__(
        self,
        names: Sequence[str],
        types: Sequence[str],
        calls: Mapping[str, list[Any]],
        engine: str,
        containers: Iterable[str] = (),
    ) -> None:
        self.names: tuple[str, ...] = tuple(names)
        self.types: tuple[str, ...] = tuple(types)
        self._calls = {name: list(calls.get(name, [])) for name in self.names}
        self.engine = engine
        #: selected ModuleList/ModuleDict containers: they hold layers but are never called
        self.containers = frozenset(containers)

    @overload
    def __getitem__(self, index: int | str) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...
    def __getitem__(self, index: int | str | slice) -> Any:
        if isinstance(index, slice):
            return [self[name] for name in self.names[index]]
        if isinstance(index, str):
            if index not in self._calls:
                raise KeyError(f"{index!r} is not one of the measured layers: {', '.join(self.names)}")
            calls = self._calls[index]
            return calls[-1] if calls else None
        return self[self.names[index]]

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[Any]:
        return (self[name] for name in self.names)

    def calls(self, name: str) -> list[Any]:
        """The output size of every call of layer ``name``, in order."""
        self[name]  # validates the name
        return list(self._calls[name])

    def ran(self, name: str) -> bool:
        """Whether layer ``name`` ran during the forward."""
        return bool(self.calls(name))

    @property
    def never_ran(self) -> list[str]:
        """The selected layers that did not run (containers, which cannot run, excluded)."""
        return [name for name in self.names if not self._calls[name] and name not in self.containers]

    def items(self) -> list[tuple[str, Any]]:
        """``(name, size)`` pairs, in order."""
        return [(name, self[name]) for name in self.names]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{name: {"type": ..., "calls": [shape, ...]}}`` with shapes as lists."""
        return {
            name: {"type": kind, "calls": [jsonable_shape(shape) for shape in self._calls[name]]}
            for name, kind in zip(self.names, self.types, strict=True)
        }

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LayerSizes):
            return self.names == other.names and self._calls == other._calls
        if isinstance(other, (list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __str__(self) -> str:
        width = max(
            (len(name) + len(kind) + 3 for name, kind in zip(self.names, self.types, strict=True)), default=0
        )
        lines = []
        for name, kind in zip(self.names, self.types, strict=True):
            calls = self._calls[name]
            label = f"{name} ({kind})".ljust(width)
            if not calls:
                lines.append(
                    f"{label}  {'container, not called' if name in self.containers else 'never ran'}"
                )
            else:
                lines.append(f"{label}  " + "  |  ".join(format_shape(shape) for shape in calls))
        return "\n".join(lines)

    def __repr__(self) -> str:
        inner = ", ".join(f"{name!r}: {format_shape(self[name])}" for name in self.names)
        return f"LayerSizes({{{inner}}}, engine={self.engine!r})"


def model_sizes(
    model: nn.Module,
    size: Sequence[int] | torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    input: Any = None,
    modules: ModuleSpec = None,
    engine: str = "auto",
    **forward_kwargs: Any,
) -> LayerSizes:
    """The output size of each layer of ``model`` for a batch of one of spatial ``size``.

    Works on any ``nn.Module``. ``modules`` defaults to the model's direct children (fastai's
    order for a Sequential; the model itself when it has none); it also takes ``"leaves"``,
    ``"all"``, qualified names or globs, module types or module objects. ``input`` (a tensor,
    a tuple of positional inputs or a dict of keyword inputs, or the one input when no key
    names a parameter of the forward) replaces the dummy batch for
    models whose input cannot be guessed (data given as ``size``, ``model_sizes(model, x)``,
    is taken as ``input``); nested (ragged) tensors run on the real engine, and their sizes
    hold ``None`` in a ragged dimension (shown as ``2..5``, shortest to longest). Any other
    keyword argument goes to the forward beside the input (``src_key_padding_mask=mask``).
    No weights are computed on or copied when the meta/fake engines can run the model
    (``sizes.engine`` tells which ran).

    >>> net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten())
    >>> sizes = model_sizes(net, (32, 32))
    >>> sizes[0], sizes[-1], sizes.engine
    (torch.Size([1, 16, 16, 16]), torch.Size([1, 4096]), 'meta')
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not ours
    model = _check_model(model)
    if is_input_data(size):
        if input is not None:
            raise ValueError("got input data both as size and as input=; pass it once")
        size, input = None, size
    with gc_paused():
        return _model_sizes(model, cast("Sequence[int] | None", size), input, modules, engine, forward_kwargs)


def _model_sizes(
    model: nn.Module,
    size: Sequence[int] | None,
    input: Any,
    modules: ModuleSpec,
    engine: str,
    forward_kwargs: dict[str, Any],
) -> LayerSizes:
    __tracebackhide__ = True
    # a model without children (a bare nn.LSTM) is its own only layer
    default = "children" if next(model.children(), None) is not None else "all"
    selected = select_modules(model, modules, default=default)
    if input is None:
        _, kwargs = with_forward_kwargs(model, (), {}, forward_kwargs, "model_sizes")
        trace = trace_dummy(model, size, engine=engine, kwargs=kwargs)
    else:
        if size is not None:
            raise ValueError("pass either size= or input=, not both")
        args, kwargs = _normalise_input(input, "input", model)
        args, kwargs = with_forward_kwargs(model, args, kwargs, forward_kwargs, "model_sizes")
        trace = trace_model(model, args, kwargs, engine=engine)
    by_module: dict[int, list[Any]] = {}
    for call in trace.calls:
        by_module.setdefault(id(call.module), []).append(call.output_shapes)
    calls = {name: by_module.get(id(module), []) for name, module in selected}
    return LayerSizes(
        [name for name, _ in selected],
        [type(module).__name__ for _, module in selected],
        calls,
        trace.engine,
        containers=[name for name, module in selected if is_container(module)],
    )


def is_container(module: nn.Module) -> bool:
    """ModuleList, ModuleDict and the parameter containers hold things but cannot be called."""
    return isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict))


# --------------------------------------------------------------------------- num_features_model

_SIZE_ERROR = re.compile(
    r"kernel size can't be greater|output size is too small|input size|too small|"
    r"smaller than|larger than the input|padding|pad should be",
    re.IGNORECASE,
)


def num_features_model(model: nn.Module, *, max_side: int = 4096) -> int:
    """The number of features (channels) ``model`` outputs: dimension 1 of its output for a
    dummy batch. Tries small inputs first (8, 16, 32, ...) and retries a larger one only when the
    forward failed because the input was too small; other errors propagate.

    >>> num_features_model(nn.Sequential(nn.Conv2d(3, 32, 3), nn.AdaptiveAvgPool2d(1)))
    32
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not ours
    spec = input_spec(model)
    side = 8
    while True:
        size = (side,) * spec.spatial_rank if spec.spatial_rank else None
        try:
            sizes = model_sizes(model, size, modules="all")
        except LayerError as error:
            cause = error.original or error
            if spec.spatial_rank is None or side >= max_side or not _SIZE_ERROR.search(str(cause)):
                raise
            side *= 2
            continue
        output = sizes[""]
        leaves = (
            [shape for _, shape in tensor_leaves(output)] if not isinstance(output, torch.Size) else [output]
        )
        if not leaves or len(leaves[0]) < 2:
            raise ValueError(f"{type(model).__name__} output {format_shape(output)} has no feature dimension")
        return int(leaves[0][1])
