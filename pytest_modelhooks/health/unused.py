"""Trainable parameters that got no gradient, grouped by module and told why.

A parameter without a gradient is one row only where its module's other parameters got theirs
(its forward does not use it, or not through autograd); where every parameter of a module got
none, the module is one row (a dead branch of forty parameters is one finding, not forty), the
outermost such module. Each says what the module did while recording, as ``grads.calls``
(:class:`~pytest_modelhooks.stats.calls.ModuleCalls`) saw it: never ran (a branch not taken, a
layer built but never called), ran only with gradients off, or ran and its output never reached
the loss (discarded, detached, or cut off before it).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

from pytest_modelhooks.findings import Finding

if TYPE_CHECKING:
    from pytest_modelhooks.stats.gradients import GradientStats


def _ancestors(param: str) -> list[str]:
    """The modules above a parameter, outermost (the model, ``""``) first."""
    parts = param.split(".")[:-1]
    return [""] + [".".join(parts[: depth + 1]) for depth in range(len(parts))]


def unused_findings(grads: GradientStats, unused: list[str], judged: list[str]) -> list[Finding]:
    """Findings for the parameters ``unused`` (names, in the model's order) among ``judged``
    (every tracked parameter the check looks at, with or without a gradient).

    >>> import torch
    >>> from torch import nn
    >>> from pytest_modelhooks import GradientStats
    >>> net = nn.ModuleDict({"used": nn.Linear(4, 2), "spare": nn.Linear(4, 2)})
    >>> with GradientStats(net) as grads:
    ...     net["used"](torch.randn(3, 4)).sum().backward()
    >>> (finding,) = unused_findings(grads, ["spare.weight", "spare.bias"], list(grads.to_dict()))
    >>> finding.layer, finding.layer_type
    ('spare', 'Linear, 2 parameters')
    >>> print(finding.note)
    unused: 'spare' never ran while recording (a branch not taken, or a layer never called)
    """
    if not unused:
        return []
    total: Counter[str] = Counter()
    missing: Counter[str] = Counter()
    wanted = set(unused)
    for name in judged:
        for module in _ancestors(name):
            total[module] += 1
            missing[module] += name in wanted
    shapes = {name: tuple(param.shape) for name, param in grads.params}
    modules = dict(grads.model.named_modules())
    groups: dict[str, list[str]] = {}
    for name in unused:
        # the outermost module none of whose judged parameters got a gradient; where even the
        # parameter's own module has others that did, the parameter alone
        whole = next((module for module in _ancestors(name) if missing[module] == total[module]), None)
        groups.setdefault(name if whole is None else whole, []).append(name)
    found = []
    for key, names in groups.items():
        if len(names) == 1:
            (name,) = names
            owner = name.rpartition(".")[0]
            layer, kind = name, "parameter " + "x".join(str(dim) for dim in shapes[name])
            alone = missing[owner] < total[owner]
        else:
            owner = layer = key
            kind = f"{_type_name(modules[key])}, {len(names)} parameters"
            alone = False
        note = _why(grads, owner, alone=alone, group=len(names) > 1)
        found.append(Finding(layer, kind, "grad", math.nan, "a gradient", None, note))
    return found


def _type_name(module: object) -> str:
    """A module's class name; a TorchScript module's is the class it was scripted from."""
    return str(getattr(module, "original_name", None) or type(module).__name__)


def _why(grads: GradientStats, owner: str, *, alone: bool, group: bool) -> str:
    """The note of a row whose module is ``owner``: ``alone``, a parameter whose module's other
    parameters got gradients; ``group``, a row for several parameters."""
    where = f"'{owner}'" if owner else f"the model ({_type_name(grads.model)})"
    if alone:
        return (
            f"unused: the other parameters of {where} got gradients, this one none: the forward did "
            "not use it (a path these inputs do not take), or used it outside autograd (.data, "
            ".detach(), torch.no_grad())"
        )
    if not grads.calls.seen():  # (TorchScript, compiled: what ran is not known)
        return "unused: none of its parameters got a gradient" if group else "unused: its .grad stayed None"
    ran = grads.calls.ran(owner)
    if ran is None:
        return f"unused: {where} never ran while recording (a branch not taken, or a layer never called)"
    if not ran:
        return f"unused: {where} ran only with gradients off (torch.no_grad(), inference_mode)"
    return (
        f"unused: {where} ran, but none of its output reached the loss (discarded, detached, "
        "or cut off before it)"
    )
