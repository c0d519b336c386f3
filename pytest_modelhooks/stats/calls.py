""":class:`ModuleCalls`: which of a model's modules ran while recording, and whether any call
had gradients on; what tells a parameter without a gradient in a branch never taken from one
in a branch run under ``torch.no_grad()`` or whose output was thrown away.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pytest_modelhooks._torch import compiled_call, compiled_original, is_compiling
from pytest_modelhooks.hooks.core import weak_hook


class ModuleCalls:
    """Watch the modules named ``names`` of ``model`` (and the model itself) for calls.

    Each takes a forward pre-hook that notes the call and, at the first call with gradients
    on, removes itself: after one step nothing is left to cost anything. A call traced by
    ``torch.compile`` is not a call of the model and is not counted; TorchScript takes no
    module hooks, and nothing is watched there (:meth:`seen` says so).

    >>> net = nn.ModuleDict({"used": nn.Linear(3, 1), "spare": nn.Linear(3, 1)})
    >>> calls = ModuleCalls(net, ["used", "spare"])
    >>> calls.start()
    >>> _ = net["used"](torch.randn(2, 3))
    >>> calls.stop()
    >>> calls.ran("used"), calls.ran("spare"), calls.seen()
    (True, None, True)
    """

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        self.model = model
        wanted = {*names, ""}
        self.watched = {name: module for name, module in model.named_modules() if name in wanted}
        self._ran: dict[str, bool] = {}  # name -> whether a call had gradients on
        self._handles: dict[str, Any] = {}

    def start(self) -> None:
        """Watch what has not run with gradients on yet (idempotent)."""
        if isinstance(self.model, torch.jit.ScriptModule):
            return
        for name, module in self.watched.items():
            if name not in self._handles and not self._ran.get(name):
                hook = functools.partial(weak_hook(self, "_called"), name)
                self._handles[name] = module.register_forward_pre_hook(hook)

    def stop(self) -> None:
        """Remove every hook left (idempotent)."""
        for handle in self._handles.values():
            handle.remove()
        self._handles = {}

    def _called(self, name: str, module: nn.Module, args: Any) -> None:
        if is_compiling():
            return  # (traced into a graph: a call of the trace, not of the model)
        if not torch.is_grad_enabled():
            self._ran.setdefault(name, False)
            return
        self._ran[name] = True
        handle = self._handles.pop(name, None)
        if handle is not None:
            handle.remove()

    def ran(self, name: str) -> bool | None:
        """Whether module ``name``, or a watched module inside it, ran: True with gradients on,
        False only with them off (``torch.no_grad()``, ``inference_mode``), None never (a
        branch not taken, a layer built but never called). ``ValueError`` for TorchScript and
        for a module with nothing watched inside it; ``AttributeError`` for a name the model
        does not have."""
        if isinstance(self.model, torch.jit.ScriptModule):
            raise ValueError(f"{type(self.model).__name__} is TorchScript: its module calls are not seen")
        self.model.get_submodule(name)  # an AttributeError naming what is missing
        prefix = name + "." if name else ""
        inside = [watched for watched in self.watched if watched == name or watched.startswith(prefix)]
        if not inside:
            raise ValueError(f"{name!r} holds no tracked parameter: its calls are not watched")
        seen = [self._ran[watched] for watched in inside if watched in self._ran]
        return any(seen) if seen else None

    def seen(self) -> bool:
        """Whether :meth:`ran` sees the model's calls: not in TorchScript, nor where a module is
        compiled (``torch.compile``, ``Module.compile()``: what is inside runs in the compiled
        graph), nor where no call came at all (a compiled wrapper of the model was called)."""
        if isinstance(self.model, torch.jit.ScriptModule) or not self._ran:
            return False
        return not any(
            compiled_original(module) is not None or compiled_call(module) is not None
            for module in self.model.modules()
        )
