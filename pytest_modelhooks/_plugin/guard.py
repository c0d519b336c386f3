"""The hook guard (``--modelhooks-check-leaks``): a test's teardown fails when a model it handed to
a fixture holds hooks it did not hold before.
"""

from __future__ import annotations

from typing import Any

import pytest
from torch import nn

from pytest_modelhooks._plugin.settings import CURRENT_ITEM, WATCHED, Settings
from pytest_modelhooks._torch import hook_entries

__all__ = ["hook_ids", "added_hooks", "watch"]


def hook_ids(model: nn.Module) -> set[tuple[str, str, int]]:
    """``(module name, hook dict, handle id)`` of every hook on ``model`` and its submodules."""
    return {
        (name, attribute, hook_id)
        for name, module in model.named_modules()
        for attribute, hook_id in hook_entries(module)
    }


def watch(config: pytest.Config, settings: Settings, model: nn.Module) -> None:
    """Remember ``model``'s hooks as they are now, for the hook guard."""
    item = config.stash.get(CURRENT_ITEM, None)
    if not settings.hook_guard or item is None:
        return
    watched = item.stash.setdefault(WATCHED, {})
    if id(model) not in watched:
        watched[id(model)] = (model, hook_ids(model))


_KINDS = {
    "_forward_hooks": "forward hook",
    "_forward_pre_hooks": "forward pre-hook",
    "_backward_hooks": "backward hook",
    "_backward_pre_hooks": "backward pre-hook",
}


def added_hooks(watched: dict[int, Any]) -> list[str]:
    """One line per module of a watched model holding hooks it did not hold when handed over."""
    problems = []
    for model, baseline in watched.values():
        new = sorted(hook_ids(model) - baseline)
        modules = dict(model.named_modules())
        by_module: dict[str, list[str]] = {}
        for name, attribute, _ in new:
            by_module.setdefault(name, []).append(_KINDS[attribute])
        for name, kinds in by_module.items():
            label = f"'{name}'" if name else "the model itself"
            counted = ", ".join(
                f"{kinds.count(kind)} {kind}{'s' if kinds.count(kind) > 1 else ''}"
                for kind in sorted(set(kinds))
            )
            problems.append(f"  {type(model).__name__} {label} ({type(modules[name]).__name__}): {counted}")
    return problems
