"""One training step traced on fake tensors: the model's parameters and buffers are swapped for
fake stand-ins (shapes, dtypes and devices, no data), so nothing is computed or copied and a
model built on the meta device is measured as easily as one with weights."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from pytest_modelhooks._torch import FAKE_TENSOR_LOGGER, fake_tensor_mode
from pytest_modelhooks._tree import map_tensors, tensor_leaves
from pytest_modelhooks.errors import LayerError, describe
from pytest_modelhooks.hooks.state import preserve_training_flags
from pytest_modelhooks.inputs import (
    check_model,
    input_spec,
    make_input,
    model_device_dtype,
    normalise_input,
    with_forward_kwargs,
)
from pytest_modelhooks.memory.kernels import fake_kernel
from pytest_modelhooks.memory.report import MemoryReport, build_report
from pytest_modelhooks.memory.tracker import Tracker, tracking
from pytest_modelhooks.tracing.engines import is_engine_limitation, swapped_tensors
from pytest_modelhooks.tracing.state import python_state_kept
from pytest_modelhooks.units import CUDA_BLOCK

#: what torch's errors say when fake tensors cannot follow values
_DATA_DEPENDENT = (
    "datadependent",
    "data-dependent",
    "data dependent",
    "_local_scalar_dense",
    "dynamic_output_shape",
)

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd": lambda params: torch.optim.SGD(params, lr=1e-3),
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=1e-3, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3),
}

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
OptimizerSpec = str | type | OptimizerFactory | None


def optimizer_factory(optimizer: OptimizerSpec) -> OptimizerFactory | None:
    """``optimizer=`` as a function of the parameters (``None``: no step)."""
    if optimizer is None:
        return None
    if isinstance(optimizer, str):
        factory = OPTIMIZERS.get(optimizer.lower())
        if factory is None:
            raise ValueError(
                f"optimizer={optimizer!r}: expected one of {', '.join(map(repr, OPTIMIZERS))}, an "
                f"optimizer class or a function of the parameters, or None (no step)"
            )
        return factory
    if callable(optimizer):
        return optimizer
    raise TypeError(f"optimizer must be a name, an optimizer class or a callable, got {describe(optimizer)}")


def _inputs(
    model: nn.Module, input: Any, input_size: Any, dtype: torch.dtype | None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if (input is None) == (input_size is None):
        raise ValueError("model_memory(): give input= (a batch) or input_size= (its shape, batch included)")
    if input is not None:
        return normalise_input(input, "input", model)
    shapes = [input_size] if input_size and isinstance(input_size[0], int) else list(input_size)
    if not shapes or not all(
        isinstance(shape, Sequence) and shape and all(isinstance(d, int) and d > 0 for d in shape)
        for shape in shapes
    ):
        raise ValueError(
            f"input_size={input_size!r}: expected a shape of positive ints, batch included, "
            f"such as (8, 3, 224, 224), or a list of them"
        )
    device, model_dtype = model_device_dtype(model)
    try:
        spec = input_spec(model)
        tokens = spec.channels if spec.layout == "tokens" else None
    except (TypeError, ValueError):
        tokens = None
    made = [
        make_input(shape, device, dtype or model_dtype, token_range=tokens if index == 0 else None)
        for index, shape in enumerate(shapes)
    ]
    return tuple(made), {}


def _loss(output: Any) -> torch.Tensor:
    """The default loss: the sum of every floating-point output (a mean costs the same)."""
    parts = [t.float().sum() for _, t in tensor_leaves(output) if t.is_floating_point() and t.requires_grad]
    if not parts:
        raise ValueError(
            "model_memory(): the output holds no floating-point tensor that requires grad, so no "
            "backward can run; pass loss= (a function of the output), or mode='eval'"
        )
    return torch.stack(parts).sum() if len(parts) > 1 else parts[0]


@contextmanager
def _fake_quietly() -> Iterator[Any]:
    """A fake tensor mode; torch logs each fake kernel failure at ERROR level, and a failure
    here is reported as a LayerError instead."""
    log = logging.getLogger(FAKE_TENSOR_LOGGER)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        with fake_tensor_mode(allow_non_fake_inputs=True) as mode:
            yield mode
    finally:
        log.setLevel(level)


def model_memory(
    model: nn.Module,
    input: Any = None,
    *,
    input_size: Any = None,
    optimizer: OptimizerSpec = "adamw",
    mode: str = "train",
    dtype: torch.dtype | None = None,
    autocast: torch.dtype | None = None,
    loss: Callable[[Any], torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    engine: str = "fake",
    **forward_kwargs: Any,
) -> MemoryReport:
    """The memory of one training step of ``model`` (forward, backward, ``optimizer.step()``),
    traced on fake tensors: nothing is computed, the model's weights are neither copied nor
    read, and a model on the meta device works.

    ``input`` is a batch (a tensor, a tuple of positional inputs or a dict of keyword ones), or
    ``input_size`` its shape, batch included (a list of shapes for several inputs; the first is
    token ids when the model starts with an embedding). ``optimizer`` is ``"sgd"``,
    ``"sgd-momentum"``, ``"adam"``, ``"adamw"``, an optimizer class, a function of the
    parameters, or ``None`` (forward and backward only); its state is what it allocates on a
    first step (taken on zero gradients, no forward needed), and the step measured starts with
    that state alive, as every training step after the first does.
    ``mode="eval"`` measures a forward under ``no_grad``. ``dtype`` casts the parameters and
    floating inputs; ``autocast`` runs the forward under ``torch.autocast`` with that dtype.
    ``loss`` turns the output into the loss (default: the sum of its floating-point tensors).
    ``device="cuda"`` (default: the model's device) sizes each allocation as the CUDA caching
    allocator does (512-byte blocks). ``engine="real"`` runs the step for real on copies of the
    parameters and buffers (the model keeps its own): for a forward whose shapes depend on its
    values, which fake tensors cannot follow. Other keywords go to the forward.

    >>> report = model_memory(nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)),
    ...                       input_size=(64, 512))
    >>> print(report.headline())
    Sequential training step, adamw, input 64x512 float32: peak 6.2 MiB in step
    >>> report.parameter_bytes == (512 * 512 + 512 + 512 * 10 + 10) * 4
    True
    """
    model = check_model(model)
    _check_options(mode, engine, dtype, autocast)
    factory = optimizer_factory(optimizer) if mode == "train" else None
    args, kwargs = _inputs(model, input, input_size, dtype)
    args, kwargs = with_forward_kwargs(model, args, kwargs, forward_kwargs, "model_memory")
    model_device = model_device_dtype(model)[0]
    target = torch.device(device) if device is not None else model_device
    tracker = Tracker(
        block=CUDA_BLOCK if target.type == "cuda" else 1, run=fake_kernel if engine == "fake" else None
    )
    _run(model, tracker, args, kwargs, factory, mode, engine, dtype, autocast, target, loss or _loss)
    return build_report(
        tracker,
        model=type(model).__name__,
        mode=mode,
        optimizer=_optimizer_name(optimizer) if mode == "train" else None,
        device=target,
        inputs=[(tuple(t.shape), _dtype_name(t.dtype)) for _, t in tensor_leaves((args, kwargs))],
        autocast=autocast,
    )


def _check_options(mode: str, engine: str, dtype: torch.dtype | None, autocast: torch.dtype | None) -> None:
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got mode={mode!r}")
    if engine not in ("fake", "real"):
        raise ValueError(f"engine must be 'fake' or 'real', got engine={engine!r}")
    for name, value in (("dtype", dtype), ("autocast", autocast)):
        if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
            raise TypeError(f"{name} must be a floating-point torch.dtype, got {describe(value)}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _run(
    model: nn.Module,
    tracker: Tracker,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    factory: OptimizerFactory | None,
    mode: str,
    engine: str,
    dtype: torch.dtype | None,
    autocast: torch.dtype | None,
    target: torch.device,
    loss: Callable[[Any], torch.Tensor],
) -> None:
    """The step itself, on stand-ins for the model's tensors; the model is left as it was."""
    named = list(model.named_modules())
    modules = [module for _, module in named]
    with ExitStack() as stack:
        stack.enter_context(python_state_kept(modules))
        stack.enter_context(preserve_training_flags(model, eval_mode=mode == "eval", modules=modules))
        if mode == "train":
            model.train()
        if engine == "fake":
            convert = _fake_converter(stack.enter_context(_fake_quietly()))
        elif any(t.device.type == "meta" for t in (*model.parameters(), *model.buffers())):
            raise ValueError(
                "model_memory(engine='real'): the model is on the meta device (no weights to run)"
            )
        else:
            convert = _copier()
        params, buffers = _stand_ins(stack, modules, convert, tracker, dtype)
        run_args, run_kwargs = map_tensors((args, kwargs), lambda t: _cast(convert(t), dtype))
        for _, tensor in tensor_leaves((run_args, run_kwargs)):
            tracker.track(tensor, "input")
        # a model on meta runs as fake CPU tensors: autocast (and kernels' choices) need a device
        compute = target if target.type not in ("meta", "cuda") else model_device_dtype(model)[0]
        compute = torch.device("cpu") if compute.type == "meta" else compute
        context = _StepContext(model, tracker, named, params, autocast, compute, loss, engine == "fake")
        if factory is None:
            context.forward_backward(run_args, run_kwargs, backward=mode == "train")
            optimizer_object = None
        else:
            optimizer_object = factory(params)
            tracker.measuring = False
            context.warm_up(optimizer_object)
            tracker.begin_measured()
            context.step(optimizer_object, run_args, run_kwargs)
        tracker.sweep_between()
        _optimizer_roles(tracker, optimizer_object)
        del params, buffers, run_args, run_kwargs, optimizer_object


def _optimizer_name(optimizer: OptimizerSpec) -> str | None:
    if optimizer is None or isinstance(optimizer, str):
        return optimizer
    return getattr(optimizer, "__name__", type(optimizer).__name__)


def _fake_converter(fake: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """Fake stand-ins for real tensors; for meta ones, fake CPU tensors of the same layout (a
    meta tensor has no autocast, and its fake would be meta too)."""

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "meta":
            return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="cpu")
        stand_in = fake.from_tensor(tensor)
        if stand_in.untyped_storage().nbytes() != stand_in.numel() * stand_in.element_size():
            # a view of a larger tensor (``batch[:2]``) or an expanded one gets a storage of
            # its own, as the real engine's copy does: the step is that of the tensor given
            return stand_in.clone()  # type: ignore[no-any-return]
        return stand_in  # type: ignore[no-any-return]

    return convert


def _copier() -> Callable[[torch.Tensor], torch.Tensor]:
    """Copies for the real engine, one per tensor: an input passed twice (T5's ids as both
    encoder and decoder input) stays one storage, as its fake stand-in is."""
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # the original kept: its id stays its

    def copy(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in made:
            made[id(tensor)] = (tensor, tensor.detach().clone())
        return made[id(tensor)][1]

    return copy


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _stand_ins(
    stack: ExitStack,
    modules: list[nn.Module],
    convert: Callable[[torch.Tensor], torch.Tensor],
    tracker: Tracker,
    dtype: torch.dtype | None,
) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    """Fake (or copied) parameters, trainable as the originals are, and buffers in place of
    the model's for the block; the originals go back when it ends."""
    params: list[nn.Parameter] = []
    buffers: list[torch.Tensor] = []
    param_ids = {id(p) for module in modules for p in module._parameters.values() if p is not None}

    def make(tensor: torch.Tensor) -> torch.Tensor:
        stand_in = _cast(convert(tensor.detach()), dtype)
        if id(tensor) in param_ids:
            param = nn.Parameter(stand_in, requires_grad=tensor.requires_grad)
            tracker.track(param, "parameter")
            if param.requires_grad:
                params.append(param)
            return param
        tracker.track(stand_in, "buffer")
        buffers.append(stand_in)
        return stand_in

    stack.enter_context(swapped_tensors(modules, make))
    return params, buffers


class _StepContext:
    def __init__(
        self,
        model: nn.Module,
        tracker: Tracker,
        named: list[tuple[str, nn.Module]],
        params: list[nn.Parameter],
        autocast: torch.dtype | None,
        device: torch.device,
        loss: Callable[[Any], torch.Tensor],
        fake: bool,
    ) -> None:
        self.model, self.tracker, self.named, self.params = model, tracker, named, params
        self.fake = fake
        self.autocast, self.device, self.loss = autocast, device, loss

    def forward_backward(self, args: tuple[Any, ...], kwargs: dict[str, Any], *, backward: bool) -> None:
        tracker = self.tracker
        with tracking(tracker, self.named):
            tracker.phase = "forward"
            grad = torch.enable_grad() if backward else torch.no_grad()
            device_type = self.device.type
            cast = (
                torch.autocast(device_type, dtype=self.autocast)
                if self.autocast is not None
                else torch.autocast(device_type, enabled=False)
            )
            with grad, cast:
                output = self._run(args, kwargs)
                value = self.loss(output) if backward else None
            del output
            if value is not None:
                tracker.phase = "backward"
                value.backward()  # type: ignore[no-untyped-call]
                tracker.backward_done()
                for param in self.params:  # before zero_grad sets them to None
                    if param.grad is not None:
                        storage = tracker.track(param.grad)
                        if storage is not None and not storage.role:
                            storage.role = "gradient"
            del value
            tracker.phase = "setup"

    def warm_up(self, optimizer: torch.optim.Optimizer) -> None:
        """A first ``step()`` on zero gradients: the optimizer allocates its state (Adam's
        moments, momentum buffers) as it does on a first real step, and the step measured next
        starts with it, as every step after the first does. No forward is needed for that."""
        with self.tracker:
            for param in self.params:
                param.grad = torch.zeros_like(param)
            self.tracker.phase = "step"
            optimizer.step()
            self.tracker.phase = "setup"
            optimizer.zero_grad(set_to_none=True)
        _optimizer_roles(self.tracker, optimizer)

    def step(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.forward_backward(args, kwargs, backward=True)
        with self.tracker:
            self.tracker.phase = "step"
            optimizer.step()
            self.tracker.phase = "setup"
            optimizer.zero_grad(set_to_none=True)

    def _run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        tracker = self.tracker
        try:
            return self.model(*args, **kwargs)
        except Exception as error:
            layer = tracker.unwind()
            name, kind = (layer.name, layer.type) if layer else ("", type(self.model).__name__)
            where = f"layer {name!r} ({kind})" if name else f"the forward of {kind}"
            first = str(error).splitlines()[0] if str(error) else ""
            text = f"{type(error).__name__} {error}".lower()
            if self.fake and any(marker in text for marker in _DATA_DEPENDENT):
                message = (
                    f"model_memory(): {where} cannot run on fake tensors (shapes without data): "
                    f"{type(error).__name__}: {first} (a forward whose shapes or control flow "
                    f"depend on the values, such as nonzero or .item(), cannot be followed "
                    f"without data: measure it with engine='real', a real step on copies of the "
                    f"weights)"
                )
            else:
                message = f"model_memory(): {where} failed: {type(error).__name__}: {first}"
                if self.fake and is_engine_limitation(error):
                    # a shape error, or a fake kernel stricter than the real one
                    message += (
                        " (raised by torch's fake kernels; if a real forward runs, engine='real' measures it)"
                    )
            raise LayerError(
                message,
                name,
                kind,
                None,
                original=error,
            ) from None


def _optimizer_roles(tracker: Tracker, optimizer: torch.optim.Optimizer | None) -> None:
    """The storages the optimizer keeps in its state (Adam's moments, momentum buffers)."""
    if optimizer is None:
        return
    for state in optimizer.state.values():
        for _, tensor in tensor_leaves(state):
            storage = tracker.track(tensor)
            if storage is not None and not storage.role:
                storage.role = "optimizer"
                tracker.pin(storage)
