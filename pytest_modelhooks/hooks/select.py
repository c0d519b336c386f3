"""Module selection: what ``modules=`` accepts (keywords, names, globs, types, module
objects), resolved to ``(qualified name, module)`` pairs.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Iterable
from typing import Any, TypeAlias

import torch
from torch import nn

from pytest_modelhooks.errors import not_a_module

#: What ``modules=`` accepts: a keyword ("children", "leaves", "all", "params"), a qualified
#: name or glob, a module type, a module object, or an iterable of these.
ModuleSpec: TypeAlias = "str | type | nn.Module | Iterable[str | type | nn.Module] | None"


_KEYWORDS = ("children", "leaves", "all", "params")


def loaded_class(module: str, name: str) -> Any:
    """``module.name`` if that module is already imported, else None: no class of a module
    nobody imported can have instances (``DTensor``, ``FSDPModule``), and importing
    ``torch.distributed`` parts to ask would cost every user their import time.

    >>> loaded_class("torch", "Tensor") is torch.Tensor, loaded_class("no.such.module", "X")
    (True, None)
    """
    found = getattr(sys.modules.get(module), name, None)
    return found if isinstance(found, type) else None


def _parametrization_parts(named: list[tuple[str, nn.Module]]) -> set[int]:
    """The ids of the modules that compute a parametrized tensor (``torch.nn.utils.parametrize``:
    ``weight_norm``, ``spectral_norm``, ``orthogonal``...): the ``parametrizations`` dict of a
    layer and everything under it. They run when the weight is read and return the weight,
    not an activation, so no keyword selects them (a name or type still does)."""
    parts: set[int] = set()
    for _, module in named:
        holder = _parametrizations(module)
        if holder is not None:
            parts.update(id(part) for part in holder.modules())
    return parts


def _parametrizations(module: nn.Module) -> nn.Module | None:
    """The ``parametrizations`` dict of a parametrized layer (a dict lookup: ``getattr`` of a
    missing attribute costs an exception per module), or None; a TorchScript module has none."""
    children = module._modules
    return children.get("parametrizations") if type(children) is dict else None


def _children_of(module: nn.Module) -> Iterable[nn.Module]:
    children = module._modules
    if type(children) is dict:  # the plain case, without children()'s generator machinery
        return [child for child in children.values() if child is not None]
    return list(module.children())


def _owns_parameters(module: nn.Module) -> bool:
    # the dict itself: parameters(recurse=False) costs ~2 us a module in generator machinery
    if any(param is not None for param in module._parameters.values()):
        return True
    # a quantized layer (torch.ao: quantize_dynamic, convert) keeps its weight packed, outside
    # _parameters, and reads it through a weight() method
    cls = type(module)
    return cls.__module__.startswith("torch.ao.nn.quantized") and callable(getattr(cls, "weight", None))


@functools.lru_cache(maxsize=256)
def glob_pattern(glob: str) -> re.Pattern[str]:
    """A module-name glob as a regular expression, as path globs read: ``*`` matches within one
    part of a dotted name, ``**`` across parts, ``?`` one character (not a dot), ``[...]`` a
    class.

    >>> [bool(glob_pattern("blocks.*").fullmatch(name)) for name in ("blocks.0", "blocks.0.attn")]
    [True, False]
    >>> bool(glob_pattern("blocks.**").fullmatch("blocks.0.attn"))
    True
    >>> bool(glob_pattern("**.conv[0-9]").fullmatch("a.b.conv1"))
    True
    """
    parts: list[str] = []
    position = 0
    while position < len(glob):
        char = glob[position]
        if glob.startswith("**", position):
            parts.append(".*")
            position += 2
            continue
        if char == "*":
            parts.append("[^.]*")
        elif char == "?":
            parts.append("[^.]")
        elif char == "[":
            end = glob.find("]", position + 2)
            if end < 0:
                parts.append(re.escape(char))
            else:
                inside = glob[position + 1 : end]
                negate = inside.startswith("!")
                parts.append(
                    "[" + ("^" if negate else "") + re.escape(inside[negate:]).replace("\\-", "-") + "]"
                )
                position = end
        else:
            parts.append(re.escape(char))
        position += 1
    return re.compile("".join(parts))


def _describe_spec(spec: object) -> str:
    if isinstance(spec, type):
        return spec.__name__
    if isinstance(spec, nn.Module):
        return f"<{type(spec).__name__} object>"
    return repr(spec)


def select_modules(
    model: nn.Module, modules: ModuleSpec = None, *, default: str = "params", argument: str = "modules"
) -> list[tuple[str, nn.Module]]:
    """Resolve a ``modules=`` argument to ``(qualified_name, module)`` pairs.

    Accepted: ``"children"`` (direct children, registration order; those of the wrapped model
    under ``DataParallel``/``DistributedDataParallel``), ``"leaves"`` (modules with
    no children), ``"all"`` (every module, the model included), ``"params"`` (modules that own
    parameters directly, or through ``torch.nn.utils.parametrize``, and quantized layers,
    whose weights are packed; the keywords leave out the parametrization modules
    themselves, whose output is a weight), a qualified name or glob
    (``"encoder.*.conv?"``), a module type, a module object, or an iterable of these. ``None``
    means ``default``. A module reused under several names appears once, under its first
    name. Matches keep the order of the spec's items, then the model's order; an empty
    selection raises ``ValueError``.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> [name for name, _ in select_modules(net, "leaves")]
    ['0', '1']
    """
    if not isinstance(model, nn.Module):
        raise not_a_module("model", model)
    named = list(model.named_modules())
    spec: Any = default if modules is None else modules
    items: list[Any]
    if isinstance(spec, (str, type, nn.Module)) or not isinstance(spec, Iterable):
        items = [spec]
    else:
        items = list(spec)
    chosen: dict[int, tuple[str, nn.Module]] = {}
    for item in items:
        matches = _match(model, named, item, argument)
        if not matches:
            raise ValueError(_no_match_message(model, named, item, argument))
        for name, module in matches:
            chosen.setdefault(id(module), (name, module))
    if not chosen:
        raise ValueError(f"{argument}={_describe_spec(spec)} selects no module of {type(model).__name__}")
    return list(chosen.values())


def hookable(model: nn.Module, modules: ModuleSpec, default: str) -> list[tuple[str, nn.Module]]:
    """:func:`select_modules` for hooks: TorchScript modules take no Python hooks, so a keyword
    selection (``"params"``, ``"all"``...) leaves them out, and naming one is an error."""
    named = select_modules(model, modules, default=default)
    scripted = [name for name, module in named if isinstance(module, torch.jit.ScriptModule)]
    if not scripted:
        return named
    spec = default if modules is None else modules
    kept = [(name, module) for name, module in named if not isinstance(module, torch.jit.ScriptModule)]
    if isinstance(spec, str) and spec in _KEYWORDS and kept:
        return kept
    shown = ", ".join(repr(name or type(model).__name__) for name in scripted[:5])
    raise TypeError(
        f"modules: {shown} {'is a TorchScript module' if len(scripted) == 1 else 'are TorchScript modules'}, "
        f"and torch.jit modules take no Python hooks; select modules outside the scripted part"
    )


def _children(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The direct children; a DataParallel/DistributedDataParallel wrapper's one child is the
    model itself, so its "children" are the wrapped model's (named as in the wrapper)."""
    prefix, root = "", model
    while isinstance(root, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        if next(root.module.children(), None) is None:
            break  # a wrapped bare LSTM: the wrapper's child is the layer
        prefix, root = f"{prefix}module.", root.module
    return [(prefix + name, module) for name, module in root.named_children()]


def _match(
    model: nn.Module, named: list[tuple[str, nn.Module]], item: Any, argument: str
) -> list[tuple[str, nn.Module]]:
    if isinstance(item, str):
        if item == "children":
            return _children(model)
        if item in ("leaves", "all", "params"):
            machinery = _parametrization_parts(named)
            layers = [(name, module) for name, module in named if id(module) not in machinery]
            if item == "leaves":  # a parametrized Linear is a leaf: its one child is machinery
                return [
                    (name, module)
                    for name, module in layers
                    if all(id(child) in machinery for child in _children_of(module))
                ]
            if item == "params":
                # a parametrized layer's weight lives under its parametrizations: still its own
                return [
                    (name, module)
                    for name, module in layers
                    if _owns_parameters(module) or _parametrizations(module) is not None
                ]
            return layers
        if any(char in item for char in "*?["):
            pattern = glob_pattern(item)
            return [(name, module) for name, module in named if name and pattern.fullmatch(name)]
        return [(name, module) for name, module in named if name == item]
    if isinstance(item, type):
        if not issubclass(item, nn.Module):
            raise TypeError(f"{argument}: {item.__name__} is not an nn.Module type")
        return [(name, module) for name, module in named if isinstance(module, item)]
    if isinstance(item, nn.Module):
        return [(name, module) for name, module in named if module is item]
    raise TypeError(
        f"{argument}: expected a name, glob, module type, module or one of {', '.join(_KEYWORDS)}; "
        f"got {type(item).__name__} {item!r}"
    )


def _no_match_message(model: nn.Module, named: list[tuple[str, nn.Module]], item: Any, argument: str) -> str:
    model_name = type(model).__name__
    if isinstance(item, nn.Module):
        return f"{argument}: the {type(item).__name__} passed is not a submodule of {model_name}"
    names = [name for name, _ in named if name]
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    return (
        f"{argument}={_describe_spec(item)} matches no module of {model_name}; "
        f"its modules are: {shown or '(none)'}"
    )
