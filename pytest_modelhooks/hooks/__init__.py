"""Hooks: :class:`Hook`, :class:`Hooks`, :func:`hook_output(s) <hook_output>`, module selection,
hook counting and :class:`HookCallback`. torch only (never pytest): usable from a notebook or a
training script.

- :mod:`.core`: registering, storing and removing hooks.
- :mod:`.select`: what ``modules=`` accepts, resolved to ``(name, module)`` pairs.
- :mod:`.state`: what a model holds (hooks, train/eval flags), to leave it as found.
- :mod:`.callback`: a training-loop callback base.
"""

from __future__ import annotations

from pytest_modelhooks.hooks.callback import HookCallback
from pytest_modelhooks.hooks.core import Hook, HookFunc, Hooks, hook_output, hook_outputs, unvmapped
from pytest_modelhooks.hooks.select import ModuleSpec, select_modules
from pytest_modelhooks.hooks.state import (
    count_hooks,
    hooks_by_module,
    preserve_training_flags,
    training_flags,
)

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
    "unvmapped",
]
