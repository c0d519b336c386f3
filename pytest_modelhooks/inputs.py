"""The input a model expects: read from its first layer, made as a dummy batch, or taken from the
user and normalised to ``(args, kwargs)``; and the checks every entry point makes of a model
before anything runs (a compiled wrapper, lazy or sharded parameters, devices).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from pytest_modelhooks._torch import compiled_original
from pytest_modelhooks._tree import tensor_leaves
from pytest_modelhooks.errors import describe, not_a_module
from pytest_modelhooks.hooks.select import loaded_class

__all__ = [
    "GIVE_INPUT",
    "InputSpec",
    "batch_for",
    "check_devices",
    "check_model",
    "dummy_batch",
    "fills_first_input",
    "forward_parameter_names",
    "first_tensor",
    "declared_size",
    "decoder_inputs",
    "in_channels",
    "input_spec",
    "is_input_data",
    "layer_label",
    "make_input",
    "model_device_dtype",
    "normalise_input",
    "refuse_lazy",
    "refuse_sharded",
    "sharded_reason",
    "spec_for",
    "takes_no_input",
    "uninitialized_lazy",
    "with_forward_kwargs",
]

CONV_RANK: dict[type[nn.Module], int] = {
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
    ``(B, L, F)`` or ``(L, B, F)``), ``"tokens"`` (Embedding: integer ids ``(B, *extra)``) or
    ``"waveform"`` (raw audio ``(B, L)``, for a one-channel Conv1d whose channel the forward
    adds).
    ``size_from`` says where ``default_size`` came from when not the layer's generic default
    (the size the model declares, or the one its forward accepted).
    """

    layer: str
    layer_type: str
    layout: str
    channels: int
    spatial_rank: int | None = None
    batch_first: bool = True
    default_size: tuple[int, ...] = ()
    size_from: str = ""

    @property
    def described(self) -> str:
        """``the first layer '0' (Conv2d)``, or ``the model (Conv2d)`` when the model is that layer."""
        if self.layer:
            return f"the first layer '{self.layer}' ({self.layer_type})"
        return f"the model ({self.layer_type})"


def spec_for(name: str, module: nn.Module) -> InputSpec | None:
    kind = type(module).__name__
    for conv_type, rank in CONV_RANK.items():
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


GIVE_INPUT = (
    "give the input explicitly (model_sizes(input=...), model_summary(input_size=... or input_data=...))"
)


def input_spec(model: nn.Module) -> InputSpec:
    """Describe the input ``model`` expects, read from its first leaf layer with parameters (in
    registration order).

    >>> input_spec(nn.Sequential(nn.Conv2d(3, 8, 3))).channels
    3
    """
    model = check_model(model)
    for name, module in model.named_modules():
        if uninitialized_lazy(module):
            refuse_lazy(name, module)  # its sizes are not known yet (in_channels=0)
        spec = spec_for(name, module)
        if spec is not None:
            declared = declared_size(model, spec.spatial_rank) if spec.layout == "channels_first" else None
            if declared is not None:
                spec = replace(spec, default_size=declared[0], size_from=declared[1])
            return spec
        is_leaf = next(module.children(), None) is None
        # A container's loose parameters (a learned scale) do not say what the input is; a leaf
        # layer with parameters of an unknown kind is the first consumer and stops the search.
        if is_leaf and next(module.parameters(recurse=False), None) is not None:
            raise ValueError(
                f"cannot tell the input of {type(model).__name__}: its first layer with parameters, "
                f"{layer_label(name, module)}, is not a convolution, Linear, norm, RNN, attention or "
                f"Embedding layer; {GIVE_INPUT}"
            )
    raise ValueError(
        f"cannot tell the input of {type(model).__name__}: it has no layer with parameters; {GIVE_INPUT}"
    )


def _size_value(value: Any, rank: int) -> tuple[int, ...] | None:
    """``value`` (an int, or a sequence of ``rank`` ints) as a spatial size, None if it is none."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return (value,) * rank
    whole = isinstance(value, (tuple, list)) and len(value) == rank
    if whole and all(isinstance(dim, int) and not isinstance(dim, bool) and dim > 0 for dim in value):
        return tuple(value)
    return None


def declared_size(model: nn.Module, rank: int | None) -> tuple[tuple[int, ...], str] | None:
    """The spatial size ``model`` says it takes, and where it says so; None where it says none.

    Vision transformers accept one image size only (their position embeddings are that long),
    and say which: torchvision's ``image_size``, timm's ``pretrained_cfg`` with
    ``fixed_input_size`` or a strict ``patch_embed.img_size``, transformers'
    ``config.image_size``.

    >>> class ViT(nn.Module):
    ...     image_size = 224
    >>> declared_size(ViT(), 2)
    ((224, 224), 'the size its image_size gives')
    """
    if not rank:
        return None
    for attribute in ("image_size", "img_size"):
        size = _size_value(getattr(model, attribute, None), rank)
        if size is not None:
            return size, f"the size its {attribute} gives"
    # (getattr on a module looks in its parameters, buffers and submodules too: a module named
    # config or patch_embed is no declaration unless it holds the attribute)
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("fixed_input_size"):
        shape = cfg.get("input_size")
        size = _size_value(list(shape[1:]), rank) if isinstance(shape, (tuple, list)) else None
        if size is not None:
            return size, "the size its pretrained_cfg input_size gives"
    patch_embed = getattr(model, "patch_embed", None)
    if isinstance(patch_embed, nn.Module) and getattr(patch_embed, "strict_img_size", False):
        size = _size_value(getattr(patch_embed, "img_size", None), rank)
        if size is not None:
            return size, "the size its patch_embed.img_size gives"
    size = _size_value(getattr(getattr(model, "config", None), "image_size", None), rank)
    if size is not None:
        return size, "the size its config.image_size gives"
    return None


def decoder_inputs(
    model: nn.Module, kwargs: Mapping[str, Any] | None = None, batch: int = 1
) -> dict[str, torch.Tensor]:
    """The ``decoder_input_ids`` a dummy batch of ``batch`` needs beside its input: 8 token ids
    per sample for an encoder-decoder (a transformers config with ``is_encoder_decoder``: T5, BART, Whisper),
    whose forward refuses to run without them; none where ``kwargs`` gives the decoder its
    input (ids, embeddings or ``labels``) or the model is no encoder-decoder.

    >>> class Seq2Seq(nn.Module):
    ...     class config:
    ...         is_encoder_decoder, vocab_size = True, 100
    ...     def forward(self, input_ids, decoder_input_ids=None): ...
    >>> decoder_inputs(Seq2Seq())["decoder_input_ids"].shape
    torch.Size([1, 8])
    """
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not getattr(config, "is_encoder_decoder", False) or not isinstance(vocab, int) or vocab < 1:
        return {}
    given = set(kwargs or ()) & {"decoder_input_ids", "decoder_inputs_embeds", "labels"}
    if given or "decoder_input_ids" not in forward_parameter_names(model):
        return {}
    device, _ = model_device_dtype(model)
    return {"decoder_input_ids": make_input((batch, 8), device, torch.long, token_range=vocab)}


def in_channels(model: nn.Module) -> int:
    """The number of input channels (features) ``model`` expects, from the first layer that
    consumes the input: Conv1d/2d/3d (grouped convolutions included), ConvTranspose, BatchNorm,
    Linear, LayerNorm, LSTM/GRU/RNN, MultiheadAttention. For an Embedding first layer the input
    is integer ids and the vocabulary size is returned.

    >>> in_channels(nn.Sequential(nn.Conv2d(6, 12, 3, groups=3), nn.ReLU()))
    6
    """
    return input_spec(model).channels


def check_model(model: object, argument: str = "model") -> nn.Module:
    """``model`` itself, or the module a ``torch.compile`` wrapper holds: shapes and summaries
    trace the original eagerly (compiling would cost seconds and hide the submodules)."""
    if not isinstance(model, nn.Module):
        raise not_a_module(argument, model)
    original = compiled_original(model)
    return model if original is None else original


def first_tensor(model: nn.Module) -> torch.Tensor | None:
    tensor: torch.Tensor | None = next(model.parameters(), None)
    return tensor if tensor is not None else next(model.buffers(), None)


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    tensor = first_tensor(model)
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
        need = {"channels_first": "spatial", "sequence": "sequence", "waveform": "length"}.get(
            spec.layout, ""
        )
        hint = ""
        if (
            spec.layout == "channels_first"
            and len(size) == spec.spatial_rank + 2
            and size[1] == spec.channels
        ):
            # torchinfo's full shape, batch and channels included: say what to pass instead
            hint = (
                f"; size is the spatial size alone, size={size[2:]!r} (model_summary takes the "
                f"full shape, {size!r})"
            )
        raise ValueError(
            f"size={size!r} has {len(size)} dimension(s) but {spec.described} needs "
            f"{spec.spatial_rank} {need} dimension(s){hint}"
        )
    return size


def dummy_batch(model: nn.Module, size: Sequence[int] | None = None) -> torch.Tensor:
    """A batch of one that ``model`` accepts, on the model's device and floating dtype.

    ``size`` is the spatial size for convolutions (default ``(64, 64)`` for 2-d, ``(64,)`` for
    1-d, ``(16, 16, 16)`` for 3-d, or the size the model declares: see :func:`declared_size`),
    the sequence length for RNNs, attention and embeddings (default ``(8,)``), and extra leading
    dims for Linear (default none). (:func:`model_summary`, :func:`model_sizes` and
    :func:`dummy_eval` go further: where the forward refuses the default image, they try
    224x224, then 299x299; clips of 16 frames of 112x112, then 224x224; 3000 steps, then 16000,
    for a 1-d convolution, as a waveform ``(B, L)`` where the forward adds its channel; and
    they give an encoder-decoder :func:`decoder_inputs`.) Values are drawn from
    a private generator, so the global RNG is untouched and the batch is the same every time.

    >>> dummy_batch(nn.Conv2d(3, 8, 3), (32, 32)).shape
    torch.Size([1, 3, 32, 32])
    """
    return batch_for(model, input_spec(model), size)


def batch_for(model: nn.Module, spec: InputSpec, size: Sequence[int] | None) -> torch.Tensor:
    dims = _resolve_size(spec, size)
    device, dtype = model_device_dtype(model)
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


def takes_no_input(model: nn.Module, size: Sequence[int] | None) -> bool:
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


_KEY_ATTRIBUTES = ("in_channels", "in_features", "num_features", "input_size", "embed_dim", "num_embeddings")


def layer_label(name: str, module: nn.Module) -> str:
    details = [
        f"{attr}={getattr(module, attr)}"
        for attr in _KEY_ATTRIBUTES
        if isinstance(getattr(module, attr, None), int)
    ]
    inside = ", ".join([type(module).__name__, *details[:1]])
    return f"layer '{name}' ({inside})" if name else f"model {type(module).__name__}"


def _input_devices(args: Any) -> set[torch.device]:
    return {tensor.device for _, tensor in tensor_leaves(args)}


def check_devices(model: nn.Module, args: Any, argument: str) -> None:
    weights = first_tensor(model)
    if weights is None or weights.device.type == "meta":
        return
    for device in _input_devices(args):
        if device.type != "meta" and device != weights.device:
            raise ValueError(
                f"{argument} is on {device} but the weights of {type(model).__name__} are on "
                f"{weights.device}; move one of them"
            )


def uninitialized_lazy(module: nn.Module) -> bool:
    lazy: Any = module  # the mixin's methods are typed for a protocol, not for nn.Module
    return isinstance(module, LazyModuleMixin) and bool(lazy.has_uninitialized_params())


def refuse_lazy(name: str, module: nn.Module) -> NoReturn:
    where = f"layer '{name}' ({type(module).__name__})" if name else f"model {type(module).__name__}"
    raise ValueError(
        f"{where} has uninitialized parameters: a lazy module takes its sizes from its first "
        f"forward, which changes the model for good (it materializes the parameters and changes "
        f"the module's class). Run the model once on a real batch first"
    )


def sharded_reason(model: nn.Module, named: Sequence[tuple[str, nn.Module]] | None = None) -> str | None:
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


def refuse_sharded(model: nn.Module, named: Sequence[tuple[str, nn.Module]]) -> None:
    """Refuse a sharded model before anything runs: FSDP2's hooks all-gather and swap
    parameters in the forward, and a trace that swaps them too leaves the sharding state
    half-initialised."""
    reason = sharded_reason(model, named)
    if reason is not None:
        raise TypeError(
            f"cannot trace {type(model).__name__}: {reason}. Shapes and summaries trace the "
            f"unsharded model: run them before sharding it (built under torch.device('meta') "
            f"it costs no memory)"
        )


def is_input_data(value: Any) -> bool:
    """Whether a size argument was given data instead: a tensor, or a tuple, list or dict holding
    one (a shape never holds a tensor), so ``model_sizes(model, x)`` means ``input=x``."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, Mapping):
        return any(isinstance(item, torch.Tensor) for item in value.values())
    return isinstance(value, (tuple, list)) and any(isinstance(item, torch.Tensor) for item in value)


def normalise_input(
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
        f"got {describe(input)}"
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


def forward_parameter_names(model: nn.Module, *, positional: bool = False) -> list[str]:
    """The names of ``model.forward``'s parameters in order (with ``positional``, those a
    positional input can fill); empty where they cannot be told.

    >>> forward_parameter_names(nn.Linear(2, 2))
    ['input']
    """
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in parameters if not positional or p.kind in kinds]


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


def fills_first_input(model: nn.Module, forward_kwargs: Mapping[str, Any]) -> bool:
    """Whether ``forward_kwargs`` name the forward's first parameter, the one a dummy batch
    would fill: then they are the whole input, and no dummy batch is made."""
    try:
        first = next(iter(inspect.signature(model.forward).parameters.values()), None)
    except (TypeError, ValueError):
        return False
    keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return first is not None and first.kind is keyword and first.name in forward_kwargs
