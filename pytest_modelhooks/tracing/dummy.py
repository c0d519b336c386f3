"""Traces and evaluations on a dummy batch: the batch is made for the first layer with
parameters, and for the layer that really reads the input when the forward shows it is another.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from pytest_modelhooks.errors import LayerError
from pytest_modelhooks.hooks.state import preserve_training_flags
from pytest_modelhooks.inputs import (
    GIVE_INPUT,
    InputSpec,
    batch_for,
    decoder_inputs,
    fills_first_input,
    input_spec,
    sharded_reason,
    spec_for,
    takes_no_input,
)
from pytest_modelhooks.tracing.engines import no_grad_quietly, trace_model
from pytest_modelhooks.tracing.records import Trace


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
    if takes_no_input(model, size):
        with preserve_training_flags(model, eval_mode=True), no_grad_quietly():
            return model()
    spec = input_spec(model)
    decoder = decoder_inputs(model)
    with preserve_training_flags(model, eval_mode=True), no_grad_quietly():
        try:
            return model(batch_for(model, spec, size), **decoder)
        except Exception as error:
            failed = error
    if sharded_reason(model) is not None:
        raise failed  # no trace can run on a sharded model to name the layer
    _, fitting = _fitting_dummy(model, size)  # raises a LayerError naming the layer
    if fitting == spec:
        raise failed  # the trace ran where the real forward did not: the model's own failure
    with preserve_training_flags(model, eval_mode=True), no_grad_quietly():
        return model(batch_for(model, fitting, size), **decoder)


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
    if takes_no_input(model, size) or (kwargs and fills_first_input(model, kwargs)):
        if kwargs and size is not None:
            raise ValueError(
                f"size={tuple(size)!r} was given, but the keyword inputs fill "
                f"{type(model).__name__}.forward's first input; pass one or the other"
            )
        return trace_model(model, (), kwargs, engine=engine, count_flops=count_flops)
    return _fitting_dummy(model, size, engine=engine, count_flops=count_flops, kwargs=kwargs)[0]


def fitting_spec(model: nn.Module, kwargs: Mapping[str, Any] | None = None) -> InputSpec:
    """The :class:`InputSpec` whose dummy batch ``model``'s whole forward takes, traced on
    stand-ins (see :func:`trace_dummy`): :func:`input_spec`'s, or a larger size where the
    default one is too small for the model, or a waveform where the forward adds the channel
    (its ``size_from`` then says so). Where no batch fits, :func:`input_spec`'s all the same:
    the forward that uses it names the failure.

    >>> stem = nn.Sequential(nn.Conv2d(3, 8, 7, stride=8), nn.Conv2d(8, 8, 5, stride=4), nn.Conv2d(8, 8, 3))
    >>> fitting_spec(stem).default_size
    (224, 224)
    """
    try:
        return _fitting_dummy(model, None, kwargs=dict(kwargs or {}))[1]
    except Exception:  # (a model that no stand-in can run: its real forward will say why)
        return input_spec(model)


def _fitting_dummy(
    model: nn.Module,
    size: Sequence[int] | None,
    *,
    engine: str = "auto",
    count_flops: bool = False,
    kwargs: dict[str, Any] | None = None,
) -> tuple[Trace, InputSpec]:
    """:func:`trace_dummy`, and the input spec whose batch ran: the one for the first layer
    with parameters; for another layer that reads the input where the forward failed before
    the first one ran; a waveform ``(B, L)`` where the forward adds the channel a one-channel
    Conv1d reads (wav2vec 2.0); or, without a ``size``, the first larger standard size the
    whole forward accepts (a stem that needs 75x75 pixels or more, windows of 7x32, Whisper's
    3000 mel frames)."""
    __tracebackhide__ = True

    given = {**decoder_inputs(model, kwargs), **(kwargs or {})}

    def trace(spec: InputSpec, retry: bool = True) -> Trace:
        batch = batch_for(model, spec, size)
        if engine != "auto" or not retry:
            return trace_model(model, (batch,), given, engine=engine, count_flops=count_flops)
        # a retry runs on stand-ins only, as "auto" tries them: a model whose shape bug fails at
        # every size then pays no real forward at each larger one (a second and more for a deep
        # CNN at 299x299), only where its first batch failed
        try:
            return trace_model(model, (batch,), given, engine="meta", count_flops=count_flops)
        except (LayerError, ValueError):
            return trace_model(model, (batch,), given, engine="fake", count_flops=count_flops)

    spec = input_spec(model)
    try:
        return trace(spec, retry=False), spec
    except LayerError as error:
        first_error = error
    fitted = spec.layer in first_error.finished  # the batch fit the layer it was made for
    retry = None if fitted else _spec_of_layer(model, first_error.layer)
    if retry is not None and retry.layer != spec.layer:
        try:
            return trace(retry), retry
        except (LayerError, ValueError):
            pass  # the first error says more: it is about the model as the user wrote it
    base, refused = spec, first_error
    if _adds_a_channel(spec, first_error):
        base = replace(spec, layout="waveform", size_from="a waveform (the forward adds its channel)")
        try:
            return trace(base), base
        except LayerError as error:
            refused = error
        except ValueError:
            pass
    # (no larger size where the caller gave one, or the model declared its own)
    larger = _larger_sizes(base, refused) if size is None and not spec.size_from else ()
    for candidate in larger:
        try:
            return trace(candidate), candidate
        except (LayerError, ValueError):
            pass
    if fitted:
        raise first_error  # the failure is the model's own
    label = f"'{spec.layer}' ({spec.layer_type})" if spec.layer else spec.layer_type
    raise LayerError(
        f"{first_error}; the input was made for layer {label}, the first layer with parameters "
        f"(in registration order): if another layer reads the input, {GIVE_INPUT}",
        first_error.layer,
        first_error.layer_type,
        first_error.input_shapes,
        first_error.original,
    ) from None


# Where the generic default is too small for a model: ImageNet's 224x224 (ViT, MaxViT and most
# other models written for it), then Inception's 299x299; video clips of 16 frames of 112x112
# (the R(2+1)D papers' size), then of 224x224 (MViT's fixed size, S3D); audio of 3000 frames
# (Whisper's 30 seconds of 10 ms mel frames), then 16000 samples (a second at 16 kHz).
_LARGER_SIZES = {1: ((3000,), (16000,)), 2: ((224, 224), (299, 299)), 3: ((16, 112, 112), (16, 224, 224))}


def _adds_a_channel(spec: InputSpec, error: LayerError) -> bool:
    """Whether the batch for a one-channel Conv1d reached it with a dim more (the forward
    unsqueezed a channel into what it takes as a waveform ``(B, L)``)."""
    one_channel_conv1d = spec.layout == "channels_first" and spec.channels == 1 and spec.spatial_rank == 1
    if not one_channel_conv1d or error.layer != spec.layer:
        return False
    shapes = error.input_shapes
    first = shapes[0] if isinstance(shapes, tuple) and shapes else None
    return isinstance(first, tuple) and len(first) == 4


def _larger_sizes(spec: InputSpec, error: LayerError) -> Iterator[InputSpec]:
    """Specs for the larger standard sizes of an image, clip or waveform to try where the
    default one failed with ``error``."""
    if spec.layout not in ("channels_first", "waveform") or not spec.spatial_rank:
        return
    refused = "x".join(map(str, spec.default_size))
    reason = str(error).split(":")[0]
    said = f"as the forward refused {refused} ({reason})"
    for larger in _LARGER_SIZES.get(spec.spatial_rank, ()):
        yield replace(
            spec, default_size=larger, size_from=f"{spec.size_from}, {said}" if spec.size_from else said
        )


def _spec_of_layer(model: nn.Module, name: str) -> InputSpec | None:
    if not name:  # the model's own forward failed: no layer to make a batch for
        return None
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return spec_for(name, module)
