"""The hook core: register a function on modules, keep what it returns, always remove it.

Everything else in the library is built on :class:`Hook` and :class:`Hooks`. This module imports
torch only (never pytest), so it is usable from a notebook or a training script.
"""

from __future__ import annotations

import fnmatch
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any, TypeAlias

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from pytest_modelhooks import StoredOutputChanged
from pytest_modelhooks._tree import map_tensors, tensor_leaves

__all__ = [
    "Hook",
    "HookCallback",
    "HookFunc",
    "Hooks",
    "ModuleSpec",
    "count_hooks",
    "hook_output",
    "hook_outputs",
    "hooks_by_module",
    "preserve_training_flags",
    "select_modules",
    "training_flags",
]

#: ``hook_func(module, input, output)``; for backward hooks ``input``/``output`` are the
#: gradients with respect to the module's inputs and outputs.
HookFunc = Callable[[nn.Module, Any, Any], Any]

#: What ``modules=`` accepts: a keyword ("children", "leaves", "all", "params"), a qualified
#: name or glob, a module type, a module object, or an iterable of these.
ModuleSpec: TypeAlias = "str | type | nn.Module | Iterable[str | type | nn.Module] | None"

_KEYWORDS = ("children", "leaves", "all", "params")


_FUNCTORCH = getattr(torch._C, "_functorch", None)
_is_compiling: Callable[[], bool] = getattr(torch.compiler, "is_compiling", lambda: False)  # torch >= 2.3


def loaded_class(module: str, name: str) -> Any:
    """``module.name`` if that module is already imported, else None: no class of a module
    nobody imported can have instances (``DTensor``, ``FSDPModule``), and importing
    ``torch.distributed`` parts to ask would cost every user their import time.

    >>> loaded_class("torch", "Tensor") is torch.Tensor, loaded_class("no.such.module", "X")
    (True, None)
    """
    found = getattr(sys.modules.get(module), name, None)
    return found if isinstance(found, type) else None


def unvmapped(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The plain tensor under ``torch.func``'s wrappers, and how many batch dimensions vmap
    added; they are moved to the front, the outermost vmap's first. Inside ``vmap`` (or
    ``grad``) a hook sees a wrapper for one sample, which cannot be read and must not escape;
    the plain tensor holds the whole batch. Any other tensor comes back as it is, with 0.

    >>> unvmapped(torch.zeros(2, 3))[0].shape
    torch.Size([2, 3])
    """
    # (checked before the functorch query, which dynamo cannot trace: it warns and breaks)
    if _FUNCTORCH is None or _is_compiling() or not _FUNCTORCH.is_functorch_wrapped_tensor(tensor):
        return tensor, 0
    labels = list(range(tensor.dim()))  # the sample's own dims; vmap levels get -1, -2, ...
    levels = 0
    while _FUNCTORCH.is_functorch_wrapped_tensor(tensor):
        if _FUNCTORCH.is_batchedtensor(tensor):  # a grad level wraps without a batch dim
            levels += 1
            labels.insert(_FUNCTORCH.maybe_get_bdim(tensor), -levels)
        tensor = _FUNCTORCH.get_unwrapped(tensor)
    # the wrapper seen first is the innermost vmap: the outermost has the lowest label
    order = [labels.index(label) for label in range(-levels, 0)]
    order += [labels.index(dim) for dim in range(len(labels) - levels)]
    return tensor.permute(order), levels


def _detach(obj: Any, cpu: bool, clone: bool = False) -> Any:
    if isinstance(obj, torch.Tensor) and not clone:  # the common case, without the walk
        obj = unvmapped(obj)[0]
        return obj.detach().cpu() if cpu else obj.detach()
    if clone:
        return map_tensors(obj, lambda t: _copy(unvmapped(t)[0].detach(), cpu))
    if cpu:
        return map_tensors(obj, lambda t: unvmapped(t)[0].detach().cpu())
    return map_tensors(obj, lambda t: unvmapped(t)[0].detach())


def _copy(tensor: torch.Tensor, cpu: bool) -> torch.Tensor:
    moved = tensor.cpu() if cpu else tensor
    return moved.clone() if moved is tensor else moved  # .cpu() of a GPU tensor is a copy already


def _caller_level(*, past_torch: bool = False) -> int:
    """``stacklevel`` for a warning that points at the first frame outside this package (and,
    with ``past_torch``, outside torch: a hook's warning then points at the user's forward
    call, not at torch's module machinery)."""
    import os
    import sys

    here = os.path.dirname(__file__)
    torch_dir = os.path.dirname(torch.__file__) + os.sep

    def inside(filename: str) -> bool:
        return os.path.dirname(filename) == here or (past_torch and filename.startswith(torch_dir))

    frame, level = sys._getframe(1), 1
    while frame is not None and inside(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level


def _versions(obj: Any) -> list[tuple[torch.Tensor, int]]:
    """Each tensor in ``obj`` with its version counter now (in-place ops bump it; a detached
    tensor shares its source's)."""
    if isinstance(obj, torch.Tensor):
        return [(obj, obj._version)]
    if obj is None:
        return []
    return [(tensor, tensor._version) for _, tensor in tensor_leaves(obj)]


class Hook:
    """Register ``hook_func`` on ``module``; what it returns on the last call is in ``.stored``.

    ``hook_func(module, input, output)`` runs after each forward (or, with ``is_forward=False``,
    after each backward through a full backward hook, with the gradients as ``input``/``output``).
    With ``detach=True`` the tensors it receives are detached (recursively through tuples, dicts,
    dataclasses); with ``cpu=True`` they are also copied to the CPU; with ``clone=True`` they
    are copies (a detached output shares memory with the module's, so an in-place op later in
    the forward, such as ``nn.ReLU(inplace=True)``, changes it: reading ``.stored`` then warns).

    The hook is removed by :meth:`remove` (idempotent) or when the ``with`` block ends, also on
    an exception. ``.stored`` stays readable after removal.

    >>> layer = nn.Linear(3, 2)
    >>> with Hook(layer, lambda module, args, out: out.shape) as hook:
    ...     _ = layer(torch.zeros(4, 3))
    >>> hook.stored, hook.removed
    (torch.Size([4, 2]), True)
    """

    def __init__(
        self,
        module: nn.Module,
        hook_func: HookFunc,
        is_forward: bool = True,
        detach: bool = True,
        cpu: bool = False,
        *,
        clone: bool = False,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"Hook: module must be an nn.Module, got {type(module).__name__}")
        if not callable(hook_func):
            raise TypeError(f"Hook: hook_func must be callable, got {type(hook_func).__name__}")
        if isinstance(module, torch.jit.ScriptModule):
            # torch's own refusal (a RuntimeError) does not say what to hook instead
            raise TypeError(
                f"Hook: module {type(module).__name__} is a TorchScript module, and torch.jit "
                f"modules take no Python hooks; hook the eager module (before torch.jit.script) "
                f"or a module outside the scripted part"
            )
        self.module = module
        self.hook_func = hook_func
        self.is_forward = is_forward
        self.detach = detach
        self.cpu = cpu
        self.clone = clone
        self._stored: Any = None
        self._stored_versions: list[tuple[torch.Tensor, int]] = []
        self._warned = False
        self._handle: RemovableHandle | None
        if is_forward:
            self._handle = module.register_forward_hook(self.hook_fn)
        else:
            self._handle = module.register_full_backward_hook(self.hook_fn)

    def hook_fn(self, module: nn.Module, input: Any, output: Any) -> None:
        """What torch calls: prepares the arguments, then stores ``hook_func``'s result."""
        if self.detach or self.clone:
            input = _detach(input, self.cpu, self.clone) if self.detach else map_tensors(input, torch.clone)
            output = (
                _detach(output, self.cpu, self.clone) if self.detach else map_tensors(output, torch.clone)
            )
        self.stored = self.hook_func(module, input, output)
        self._stored_versions = _versions(self._stored)

    @property
    def stored(self) -> Any:
        """What ``hook_func`` returned on the last call (None before any). Warns, once, when a
        tensor in it was changed in place after it was stored."""
        versions = self._stored_versions
        if versions and not self._warned and any(tensor._version != seen for tensor, seen in versions):
            self._warned = True
            warnings.warn(
                f"Hook on {type(self.module).__name__}: a stored tensor was changed in place after "
                f"the hook stored it (by an in-place op later in the forward, such as "
                f"nn.ReLU(inplace=True)), so .stored shows the changed values, not what the module "
                f"returned; pass clone=True to keep a copy (or ignore StoredOutputChanged where only "
                f"shapes matter)",
                StoredOutputChanged,
                stacklevel=_caller_level(),
            )
        return self._stored

    @stored.setter
    def stored(self, value: Any) -> None:
        self._stored = value
        self._stored_versions = []
        self._warned = False

    @property
    def removed(self) -> bool:
        """True once the hook is no longer registered."""
        return self._handle is None

    def remove(self) -> None:
        """Deregister the hook; calling it again does nothing."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> Hook:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def __repr__(self) -> str:
        kind = "forward" if self.is_forward else "backward"
        state = "removed" if self.removed else "registered"
        return f"<Hook {kind} on {type(self.module).__name__}, {state}>"


def _as_module_list(modules: Iterable[nn.Module]) -> list[nn.Module]:
    if isinstance(modules, nn.Module) and not isinstance(modules, (nn.Sequential, nn.ModuleList)):
        raise TypeError(
            f"modules must be an iterable of modules, got a single {type(modules).__name__}; "
            f"use Hook() or pass [module]"
        )
    return list(modules)


class Hooks(Sequence[Hook]):
    """One :class:`Hook` per module, removed together.

    A sequence (``len``, ``hooks[i]``, iteration); ``.stored`` lists every hook's stored value.
    With ``names`` (one per module), ``hooks["encoder"]`` finds a hook by name and
    ``hooks.stored_by_name`` maps names to stored values. If registering fails part-way, the
    hooks already registered are removed before the error propagates.

    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    >>> with Hooks(net, lambda module, args, out: out.shape) as hooks:
    ...     _ = net(torch.zeros(2, 3))
    >>> hooks.stored
    [torch.Size([2, 4]), torch.Size([2, 4])]
    """

    def __init__(
        self,
        modules: Iterable[nn.Module],
        hook_func: HookFunc,
        is_forward: bool = True,
        detach: bool = True,
        cpu: bool = False,
        *,
        names: Sequence[str] | None = None,
    ) -> None:
        self.hooks: list[Hook] = []
        module_list = _as_module_list(modules)
        if names is not None and len(names) != len(module_list):
            raise ValueError(f"names: got {len(names)} names for {len(module_list)} modules")
        self.names: list[str] | None = list(names) if names is not None else None
        try:
            for module in module_list:
                self.hooks.append(Hook(module, hook_func, is_forward, detach, cpu))
        except BaseException:
            self.remove()
            raise

    @property
    def stored(self) -> list[Any]:
        """The stored value of every hook, in order."""
        return [hook.stored for hook in self.hooks]

    @property
    def stored_by_name(self) -> dict[str, Any]:
        """``{name: stored}`` (needs ``names``)."""
        if self.names is None:
            raise ValueError("these Hooks were created without names; index them by position")
        return dict(zip(self.names, self.stored, strict=True))

    @property
    def removed(self) -> bool:
        """True once every hook is removed."""
        return all(hook.removed for hook in self.hooks)

    def remove(self) -> None:
        """Deregister every hook; calling it again does nothing."""
        for hook in self.hooks:
            hook.remove()

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, str):
            if self.names is None or index not in self.names:
                known = ", ".join(self.names or []) or "(created without names)"
                raise KeyError(f"no hook for {index!r}; hooked modules: {known}")
            return self.hooks[self.names.index(index)]
        return self.hooks[index]

    def __len__(self) -> int:
        return len(self.hooks)

    def __iter__(self) -> Iterator[Hook]:
        return iter(self.hooks)

    def __enter__(self) -> Hooks:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else "registered"
        return f"<Hooks: {len(self.hooks)} hooks, {state}>"


def _store_output(module: nn.Module, input: Any, output: Any) -> Any:
    return output


class _OutputGradHook(Hook):
    """Stores the gradient of a module's output through tensor hooks registered during the
    forward. Unlike a full backward hook, this works when a later op modifies the output in
    place (``ReLU(inplace=True)``, ``out += identity``) and when no input requires grad."""

    def __init__(self, module: nn.Module, detach: bool, cpu: bool) -> None:
        self._warned_no_grad = False
        super().__init__(module, _store_output, is_forward=True, detach=detach, cpu=cpu)

    def hook_fn(self, module: nn.Module, input: Any, output: Any) -> None:
        leaves = [tensor for _, tensor in tensor_leaves(output) if tensor.requires_grad]
        if not leaves:
            if not self._warned_no_grad:  # a silent None costs an afternoon: say why, once per hook
                self._warned_no_grad = True
                warnings.warn(
                    f"hook_output(grad=True) on {type(module).__name__}: its output does not "
                    f"require grad (a forward under torch.no_grad() or inference_mode(), or "
                    f"nothing up to it requires grad), so no gradient is stored for that call",
                    stacklevel=_caller_level(past_torch=True),
                )
            return
        grads: list[torch.Tensor | None] = [None] * len(leaves)
        single = isinstance(output, torch.Tensor)

        def receive(position: int, grad: torch.Tensor) -> None:
            if self.detach:
                grad = grad.detach()
            grads[position] = grad.cpu() if self.cpu else grad
            self.stored = grads[0] if single else tuple(grads)

        for position, tensor in enumerate(leaves):
            tensor.register_hook(lambda grad, position=position: receive(position, grad))  # type: ignore[no-untyped-call]


def hook_output(
    module: nn.Module, detach: bool = True, grad: bool = False, cpu: bool = False, *, clone: bool = False
) -> Hook:
    """A :class:`Hook` that stores ``module``'s output (or, with ``grad=True``, the gradient of
    its output after backward: a tensor, or a tuple over the output's tensors in order).

    >>> layer = nn.Linear(3, 2)
    >>> with hook_output(layer) as hook:
    ...     _ = layer(torch.ones(1, 3))
    >>> hook.stored.shape
    torch.Size([1, 2])
    """
    if grad:
        return _OutputGradHook(module, detach, cpu)
    return Hook(module, _store_output, detach=detach, cpu=cpu, clone=clone)


def hook_outputs(
    modules: Iterable[nn.Module],
    detach: bool = True,
    grad: bool = False,
    cpu: bool = False,
    *,
    clone: bool = False,
) -> Hooks:
    """:class:`Hooks` that store each module's output (or output gradient with ``grad=True``).

    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    >>> with hook_outputs(net) as hooks:
    ...     _ = net(torch.ones(2, 3))
    >>> [out.shape for out in hooks.stored]
    [torch.Size([2, 4]), torch.Size([2, 1])]
    """
    hooks = Hooks([], _store_output)
    try:
        for module in _as_module_list(modules):
            hooks.hooks.append(hook_output(module, detach=detach, grad=grad, cpu=cpu, clone=clone))
    except BaseException:
        hooks.remove()
        raise
    return hooks


# --------------------------------------------------------------------------- module selection


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
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
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


def _hookable(model: nn.Module, modules: ModuleSpec, default: str) -> list[tuple[str, nn.Module]]:
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
            return [(name, module) for name, module in named if name and fnmatch.fnmatchcase(name, item)]
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


# --------------------------------------------------------------------------- leaving the model as found


def hooks_by_module(model: nn.Module) -> dict[str, int]:
    """How many forward/backward hooks each module of ``model`` holds (modules with none
    omitted), keyed by qualified name (``""`` is the model itself).

    >>> net = nn.Sequential(nn.Linear(2, 2))
    >>> handle = net[0].register_forward_hook(lambda *args: None)
    >>> hooks_by_module(net)
    {'0': 1}
    >>> handle.remove()
    """
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        total = _own_hook_count(module)
        if total:
            counts[name] = total
    return counts


def count_hooks(model: nn.Module) -> int:
    """The number of forward/backward hooks registered on ``model`` and its submodules
    (a reused module counted once).

    >>> count_hooks(nn.Linear(2, 2))
    0
    """
    total = 0
    for module in model.modules():  # modules() yields a reused module once
        total += _own_hook_count(module)
    return total


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _own_hook_count(module: nn.Module) -> int:
    # torch keeps per-module hooks in these dicts; there is no public accessor.
    return sum(len(getattr(module, attribute, {}) or {}) for attribute in _HOOK_DICTS)


def training_flags(model: nn.Module) -> dict[str, bool]:
    """The ``training`` flag of every module, keyed by qualified name.

    >>> training_flags(nn.Sequential(nn.Dropout()).eval())
    {'': False, '0': False}
    """
    return {name: module.training for name, module in model.named_modules()}


@contextmanager
def preserve_training_flags(
    model: nn.Module, *, eval_mode: bool = False, modules: Sequence[nn.Module] | None = None
) -> Iterator[None]:
    """Restore every module's train/eval flag when the block ends, also on an exception
    (``model.train(mode)`` alone would flatten mixed modes). With ``eval_mode=True`` the block
    runs with every module in eval mode. ``modules`` may pass ``list(model.modules())`` when the
    caller already has it (walking a 20,000-module model costs ~30 ms).

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    >>> net[1].eval()  # mixed modes
    Dropout(p=0.5, inplace=False)
    >>> with preserve_training_flags(net, eval_mode=True):
    ...     net.training
    False
    >>> net.training, net[1].training
    (True, False)
    """
    modules = list(model.modules()) if modules is None else modules
    flags = [module.training for module in modules]
    try:
        if eval_mode:
            _set_eval(modules)
        yield
    finally:
        for module, flag in zip(modules, flags, strict=True):
            if module.training != flag:
                # Set the flag itself: a train() override must not run its side effects a
                # second time.
                _set_training(module, flag)


def _set_training(module: nn.Module, flag: bool) -> None:
    if type(module).__setattr__ is nn.Module.__setattr__:
        # past Module.__setattr__, which is slow on 10,000s of modules
        object.__setattr__(module, "training", flag)
    else:
        # a ScriptModule keeps the flag in its C++ module: an instance attribute would shadow it
        module.training = flag


def _set_eval(modules: Sequence[nn.Module]) -> None:
    for module in modules:
        if type(module).train is not nn.Module.train:
            module.train(False)  # honour a custom train(), e.g. one that keeps BN frozen
        elif module.training:
            _set_training(module, False)


# --------------------------------------------------------------------------- callbacks


class HookCallback:
    """A base for training-loop callbacks that hook modules; usable from any loop.

    Subclasses define ``hook(module, input, output)``. ``on_train_begin()`` registers it on
    ``modules`` (default: every module that owns parameters), ``on_train_end()`` removes it
    when ``do_remove``. As a context manager it registers on entry and always removes on exit,
    also when the loop raises.

    >>> class Shapes(HookCallback):
    ...     def __init__(self, model):
    ...         super().__init__(model)
    ...         self.seen = []
    ...     def hook(self, module, input, output):
    ...         self.seen.append(tuple(output.shape))
    >>> net = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    >>> with Shapes(net) as callback:
    ...     _ = net(torch.zeros(5, 3))
    >>> callback.seen
    [(5, 2)]
    """

    def __init__(
        self,
        model: nn.Module,
        modules: ModuleSpec = None,
        *,
        do_remove: bool = True,
        is_forward: bool = True,
        detach: bool = True,
        cpu: bool = False,
    ) -> None:
        if type(model).__name__ == "OptimizedModule":
            warnings.warn(
                f"{type(self).__name__} got a torch.compile'd model: hooks registered after its first "
                f"call never fire. Create {type(self).__name__} on the original module before compiling.",
                stacklevel=2,
            )
        self.model = model
        self.named_modules = _hookable(model, modules, default="params")
        self.modules = [module for _, module in self.named_modules]
        self.module_names = [name for name, _ in self.named_modules]
        self.do_remove = do_remove
        self.is_forward = is_forward
        self.detach = detach
        self.cpu = cpu
        self.hooks: Hooks | None = None

    def hook(self, module: nn.Module, input: Any, output: Any) -> Any:
        """Called after each forward (or backward) of a hooked module. Override it."""
        raise NotImplementedError(f"{type(self).__name__} must define hook(module, input, output)")

    def on_train_begin(self, **kwargs: Any) -> None:
        """Register the hooks (once: a second call keeps the existing ones)."""
        if self.hooks is None or self.hooks.removed:
            self.hooks = Hooks(self.modules, self.hook, self.is_forward, self.detach, self.cpu)

    def on_batch_end(self, train: bool = True, **kwargs: Any) -> None:
        """Called after each batch; the base does nothing."""

    def on_train_end(self, **kwargs: Any) -> None:
        """Remove the hooks if ``do_remove``."""
        if self.do_remove:
            self.remove()

    def remove(self) -> None:
        """Remove the hooks now (idempotent)."""
        if self.hooks is not None:
            self.hooks.remove()

    def __enter__(self) -> Any:
        self.on_train_begin()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self.on_train_end()
        finally:
            self.remove()
