"""A training-loop callback base that hooks modules, usable from any loop (fastai's
``HookCallback`` without fastai).
"""

from __future__ import annotations

import warnings
from types import TracebackType
from typing import Any

from torch import nn

from pytest_modelhooks.hooks.core import Hooks
from pytest_modelhooks.hooks.select import ModuleSpec, hookable


class HookCallback:
    """A base for training-loop callbacks that hook modules; usable from any loop.

    Subclasses define ``hook(module, input, output)``. ``on_train_begin()`` registers it on
    ``modules`` (default: every module that owns parameters), ``on_train_end()`` removes it
    when ``do_remove``. As a context manager it registers on entry and always removes on exit,
    also when the loop raises.

    >>> import torch
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
        self.named_modules = hookable(model, modules, default="params")
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
