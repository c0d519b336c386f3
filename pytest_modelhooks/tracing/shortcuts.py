"""Module-level shortcuts for the meta engine: stand-in forwards and shape rules for the layers
that dominate deep stacks of small modules (``nn.Linear``, activations, ``Identity``, eval
``Dropout``), built from a shape and dtype without a trip through dispatch.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch

from pytest_modelhooks.tracing.dispatch import meta_like, plain_meta


def linear_shortcut(x: Any, weight: Any, bias: Any) -> tuple[torch.Tensor, int] | None:
    """``F.linear(x, weight, bias)`` on meta tensors and its multiply-adds, or None to defer."""
    if not (plain_meta(x) and plain_meta(weight) and (bias is None or plain_meta(bias))):
        return None
    if (
        x.dim() < 2
        or weight.dim() != 2
        or x.shape[-1] != weight.shape[1]
        or x.dtype != weight.dtype
        or (bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype))
    ):
        return None
    # the count torch's mm/addmm formula gives the matmul that linear decomposes into
    return meta_like(x, (*x.shape[:-1], weight.shape[0])), 2 * x.numel() * weight.shape[0]


_SAME_SHAPE_MODULES: tuple[type[torch.nn.Module], ...] = (
    torch.nn.ReLU,
    torch.nn.GELU,
    torch.nn.SiLU,
    torch.nn.Tanh,
    torch.nn.Sigmoid,
)


_IDENTITY_IN_EVAL: tuple[type[torch.nn.Module], ...] = (torch.nn.Identity, torch.nn.Dropout)


_SAME_SHAPE_FORWARDS = {kind.forward for kind in _SAME_SHAPE_MODULES}


_IDENTITY_FORWARDS = {kind.forward for kind in _IDENTITY_IN_EVAL}


def _shortcut_kind(cls: type[torch.nn.Module]) -> str | None:
    forward = getattr(cls, "forward", None)
    if forward is torch.nn.Linear.forward:
        return "linear"
    if forward in _SAME_SHAPE_FORWARDS:
        return "same shape"
    if forward in _IDENTITY_FORWARDS:
        return "identity in eval"
    return None


_STAND_IN = "_modelhooks_stand_in"  # marks the forwards module_shortcut makes


def _stand_in(forward: Callable[..., Any]) -> Callable[..., Any]:
    setattr(forward, _STAND_IN, True)
    return forward


def module_shortcut(
    module: torch.nn.Module, flops_sink: Callable[[int], None] | None
) -> Callable[..., Any] | None:
    """A stand-in ``forward`` for ``module`` on the meta engine, or None when it has none.

    Deep stacks of small layers spend most of a meta trace in torch's Python dispatch (two or
    three ops per ``nn.Linear``, ~15 us each through :class:`TraceMode`). For the commonest
    leaf modules, used exactly as torch defines them (the class's own ``forward``, nothing set
    on the instance), the stand-in builds the output directly; anything unusual (odd
    shapes, dtypes, strides, training-mode dropout) runs the module's real ``forward``, so
    errors read as torch's do. Hooks, parametrizations and ``weight``/``bias`` lookups all
    still run: only the arithmetic is skipped.
    """
    cls = type(module)
    kind = _shortcut_kind(cls)
    if kind is None or "forward" in module.__dict__:
        return None
    if kind == "linear":
        linear = module

        def linear_forward(input: Any) -> Any:
            answered = linear_shortcut(input, linear.weight, linear.bias)
            if answered is None:
                return cls.forward(linear, input)
            out, flops = answered
            if flops_sink is not None:
                flops_sink(flops)
            return out

        return _stand_in(linear_forward)
    if kind == "same shape":
        activation = module
        # read from the instance dict: a missing attribute through nn.Module.__getattr__
        # raises (and formats) an AttributeError, ~8 us a module
        approximate = module.__dict__.get("approximate", "none")
        in_place = module.__dict__.get("inplace", False)

        def activation_forward(input: Any) -> Any:
            if not plain_meta(input) or approximate not in ("none", "tanh"):
                return cls.forward(activation, input)
            if in_place:
                return input  # an in-place activation returns its input
            return meta_like(input, input.shape)

        return _stand_in(activation_forward)
    if kind == "identity in eval":
        identity = module

        def identity_forward(input: Any) -> Any:
            if identity.training or not isinstance(input, torch.Tensor):
                return cls.forward(identity, input)
            return input  # Identity, and dropout in eval mode, return their input itself

        return _stand_in(identity_forward)
    return None


#: ``rule(module, shape, dtype)`` -> ``(output shape, flops, returns its input)``, or None to defer.
ShapeRule = Callable[[torch.nn.Module, torch.Size, torch.dtype], "tuple[torch.Size, int, bool] | None"]


# Per class: whether a Linear's weight and bias are plain entries of _parameters (no class
# attribute such as a parametrization's property in the way). Weak keys: parametrize makes classes.
_PLAIN_LINEAR: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def _plain_linear_class(cls: type[torch.nn.Module]) -> bool:
    plain = _PLAIN_LINEAR.get(cls)
    if plain is None:
        plain = _PLAIN_LINEAR[cls] = not (hasattr(cls, "weight") or hasattr(cls, "bias"))
    return plain


# The rules are plain functions of the module, not closures made per module: a 10,000-layer
# stack would spend ~20 ms making them.
def _linear_rule(
    module: torch.nn.Module, shape: torch.Size, dtype: torch.dtype
) -> tuple[torch.Size, int, bool] | None:
    params = module._parameters  # what nn.Module.__getattr__ would read, ~1 us cheaper
    weight: Any = params.get("weight")
    bias: Any = params.get("bias")
    if not (plain_meta(weight) and (bias is None or plain_meta(bias))):
        return None
    out: int = weight.shape[0]
    if (
        len(shape) < 2
        or weight.dim() != 2
        or shape[-1] != weight.shape[1]
        or dtype != weight.dtype
        or (bias is not None and (bias.shape != (out,) or bias.dtype != dtype))
    ):
        return None
    return torch.Size((*shape[:-1], out)), 2 * math.prod(shape) * out, False


def _activation_rule(
    module: torch.nn.Module, shape: torch.Size, dtype: torch.dtype
) -> tuple[torch.Size, int, bool] | None:
    # the instance dict: a missing attribute through nn.Module.__getattr__ costs ~8 us
    if module.__dict__.get("approximate", "none") not in ("none", "tanh"):
        return None
    return shape, 0, bool(module.__dict__.get("inplace", False))


def _identity_rule(
    module: torch.nn.Module, shape: torch.Size, dtype: torch.dtype
) -> tuple[torch.Size, int, bool] | None:
    return None if module.training else (shape, 0, True)


_RULES: dict[str, ShapeRule] = {
    "linear": _linear_rule,
    "same shape": _activation_rule,
    "identity in eval": _identity_rule,
}


def class_shape_rule(cls: type[torch.nn.Module]) -> ShapeRule | None:
    """What the stand-in forward of a ``cls`` instance would build for a plain contiguous meta
    input of a given shape and dtype, without building it: ``rule(module, shape, dtype)`` gives
    the output shape, the multiply-adds and whether the module returns its input itself (or
    None to defer). None for classes without a stand-in; instances with a ``forward`` of their
    own (:func:`own_forward`) get none either.

    A plain ``nn.Sequential`` chains these over runs of hook-free children, so that a deep
    stack of small layers allocates no tensor between them (see ``shapes._inline_sequentials``).
    """
    kind = _shortcut_kind(cls)
    if kind is None or (kind == "linear" and not _plain_linear_class(cls)):
        # a parametrized Linear computes its weight through modules of its own, whose calls
        # belong inside the Linear's call: it takes the ordinary (recorded) path
        return None
    return _RULES[kind]


def own_forward(module: torch.nn.Module) -> bool:
    """True when a ``forward`` other than a stand-in of ours is set on the instance."""
    own = module.__dict__.get("forward")
    return own is not None and not getattr(own, _STAND_IN, False)
