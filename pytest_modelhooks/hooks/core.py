"""The hook core: register a function on modules, keep what it returns, always remove it.

Everything else in the library is built on :class:`Hook` and :class:`Hooks`. This sub-package
imports torch only (never pytest), so it is usable from a notebook or a training script.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from pytest_modelhooks._torch import FUNCTORCH, is_compiling
from pytest_modelhooks._tree import map_tensors, tensor_leaves
from pytest_modelhooks.errors import StoredOutputChanged, describe, not_a_module

#: ``hook_func(module, input, output)``; for backward hooks ``input``/``output`` are the
#: gradients with respect to the module's inputs and outputs.
HookFunc = Callable[[nn.Module, Any, Any], Any]


def unvmapped(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The plain tensor under ``torch.func``'s wrappers, and how many batch dimensions vmap
    added; they are moved to the front, the outermost vmap's first. Inside ``vmap`` (or
    ``grad``) a hook sees a wrapper for one sample, which cannot be read and must not escape;
    the plain tensor holds the whole batch. Any other tensor comes back as it is, with 0.

    >>> unvmapped(torch.zeros(2, 3))[0].shape
    torch.Size([2, 3])
    """
    # (checked before the functorch query, which dynamo cannot trace: it warns and breaks)
    if FUNCTORCH is None or is_compiling() or not FUNCTORCH.is_functorch_wrapped_tensor(tensor):
        return tensor, 0
    labels = list(range(tensor.dim()))  # the sample's own dims; vmap levels get -1, -2, ...
    levels = 0
    while FUNCTORCH.is_functorch_wrapped_tensor(tensor):
        if FUNCTORCH.is_batchedtensor(tensor):  # a grad level wraps without a batch dim
            levels += 1
            labels.insert(FUNCTORCH.maybe_get_bdim(tensor), -levels)
        tensor = FUNCTORCH.get_unwrapped(tensor)
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


def caller_level(*, past_torch: bool = False) -> int:
    """``stacklevel`` for a warning that points at the first frame outside this package (and,
    with ``past_torch``, outside torch: a hook's warning then points at the user's forward
    call, not at torch's module machinery)."""
    import os

    package_dir = os.path.dirname(os.path.dirname(__file__)) + os.sep  # all of pytest_modelhooks
    torch_dir = os.path.dirname(torch.__file__) + os.sep

    def inside(filename: str) -> bool:
        return filename.startswith(package_dir) or (past_torch and filename.startswith(torch_dir))

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


def _released(module: nn.Module, input: Any, output: Any) -> Any:
    """What a removed :class:`Hook` holds instead of its ``hook_func``."""
    raise RuntimeError(f"this hook on {type(module).__name__} was removed; its hook_func was released")


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
            raise not_a_module("Hook: module", module)
        if not callable(hook_func):
            raise TypeError(f"Hook: hook_func must be callable, got {describe(hook_func)}")
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
        # (the setter's three assignments, written out: this runs in every hook of every module)
        stored = self._stored = self.hook_func(module, input, output)
        self._stored_versions = [] if stored is None else _versions(stored)
        self._warned = False

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
                stacklevel=caller_level(),
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
        """Deregister the hook and let go of ``hook_func``; calling it again does nothing.

        Letting go matters to an object that hooks one of its own methods and keeps the hooks
        (every :class:`HookCallback`): object -> hooks -> bound method -> object is a cycle
        that reference counting cannot free, so each such recorder, with the tensors it holds,
        would wait for a full garbage collection."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
            self.hook_func = _released

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
                    stacklevel=caller_level(past_torch=True),
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


def weak_hook(owner: object, method: str) -> Callable[..., None]:
    """``owner.<method>`` as a hook that does not keep ``owner`` alive. A tensor hook is held
    by torch's C++ side, where the garbage collector cannot see the cycle parameter -> hook ->
    recorder -> model -> parameter: a recorder started and never stopped kept its model (and
    its gradients) for the life of the process, and a global optimizer hook would too."""
    ref = weakref.ref(owner)

    def hook(*args: Any) -> None:
        alive = ref()
        if alive is not None:
            getattr(alive, method)(*args)

    return hook
