"""Chance in eval mode: the module whose output changes between two forwards of the same input
(dropout left on, unguarded noise, control flow decided by a draw).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pytest_modelhooks._tree import tensor_leaves
from pytest_modelhooks.dependence.calls import CallLog
from pytest_modelhooks.dependence.reach import inside_of
from pytest_modelhooks.findings import Finding, raise_for
from pytest_modelhooks.hooks.select import ModuleSpec, hookable
from pytest_modelhooks.hooks.state import preserve_training_flags
from pytest_modelhooks.inputs import check_model, normalise_input, with_forward_kwargs

Prints = list[tuple[float, ...]]


@dataclass
class _Printed:
    """One module call of a run: fingerprints of its inputs and outputs."""

    name: str
    label: str
    type: str
    inputs: Prints
    outputs: Prints


def _fingerprint(obj: Any) -> list[torch.Tensor]:
    """Per floating-point tensor: its sum, norm and max |x|, on its device (read once per run,
    see :func:`_read`): a different draw of dropout or noise changes them. Taken as the
    tensor is made, before later in-place ops."""
    prints = []
    for _, tensor in tensor_leaves(obj):
        if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.is_meta or tensor.is_nested:
            continue
        values = (torch.view_as_real(tensor) if tensor.is_complex() else tensor).detach()
        if values.numel() == 0:
            continue
        if values.dtype not in (torch.float32, torch.float64):
            values = values.float()
        low, high = torch.aminmax(values)
        # float32 sums: the same input gives the same sum (one reduction order), and a draw
        # of dropout moves it far beyond rtol; float64 ones read ~3x slower on a CPU
        prints.append(
            torch.stack([values.sum(), torch.linalg.vector_norm(values), torch.maximum(-low, high)])
        )
    return prints


def _read(prints: list[torch.Tensor]) -> Prints:
    return [tuple(row) for row in torch.stack(prints).tolist()] if prints else []


def _same(first: Prints, second: Prints, rtol: float) -> bool:
    if len(first) != len(second):
        return False
    return all(
        abs(a - b) <= rtol * max(abs(a), abs(b)) or (math.isnan(a) and math.isnan(b))
        for one, other in zip(first, second, strict=True)
        for a, b in zip(one, other, strict=True)
    )


def _one_run(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    named: list[tuple[str, nn.Module]],
    seed: int,
) -> list[_Printed]:
    def enter(call_args: Any, call_kwargs: Any) -> tuple[Any, Any, Any]:
        return call_args, call_kwargs, _fingerprint((call_args, call_kwargs))

    # the generators of every device the model or its input is on, forked: restored after
    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    devices |= {t.device for _, t in tensor_leaves((args, kwargs))}
    cuda = sorted({device.index or 0 for device in devices if device.type == "cuda"})
    with CallLog(named, enter, _fingerprint) as log, torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(seed)  # each run its own draw: chance shows as a difference
        model(*args, **kwargs)
    # one read of every fingerprint, not one per module (a device sync each)
    flat = [row for *_, inputs, outputs in log.calls for row in (*inputs, *outputs)]
    rows = iter(_read(flat))
    return [
        _Printed(
            name,
            label,
            type(module).__name__,
            [next(rows) for _ in inputs],
            [next(rows) for _ in outputs],
        )
        for name, label, module, inputs, outputs in log.calls
    ]


def nondeterministic_layers(
    model: nn.Module,
    input: Any,
    *,
    modules: ModuleSpec = None,
    rtol: float = 1e-6,
    **forward_kwargs: Any,
) -> list[Finding]:
    """Layers whose output in eval mode changes from one forward of the same input to the
    next, as :class:`Finding` rows (empty for a model that is deterministic in eval mode).

    The forward runs twice in eval mode under ``no_grad``, torch's CPU generator seeded
    differently each time (and restored after); every module's inputs and outputs are
    fingerprinted as they are made (float64 sum, sum of squares, max), and the innermost
    module whose inputs agree between the runs while its output does not is named: dropout
    left on (``F.dropout(x, p)`` without ``training=self.training``), noise drawn in the forward
    without a train-mode guard. Values within ``rtol`` agree (on a GPU, some kernels are not
    bitwise reproducible). The model is left as it was: no hooks, the same flags.

    >>> class Noisy(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)
    ...     def forward(self, x):
    ...         return self.b(nn.functional.dropout(self.a(x), 0.5))  # training=True always
    >>> [(f.layer, f.layer_type) for f in nondeterministic_layers(Noisy(), torch.randn(3, 4))]
    [('', 'Noisy')]
    >>> nondeterministic_layers(nn.Sequential(nn.Linear(4, 4), nn.Dropout()), torch.randn(3, 4))
    []
    """
    __tracebackhide__ = True
    model = check_model(model)
    if not (isinstance(rtol, (int, float)) and not isinstance(rtol, bool) and 0 <= rtol < 1):
        raise ValueError(f"rtol must be a number in [0, 1), got rtol={rtol!r}")
    args, kwargs = normalise_input(input, "input", model)
    args, kwargs = with_forward_kwargs(model, args, kwargs, forward_kwargs, "nondeterministic_layers")
    named = hookable(model, modules, default="all")
    with preserve_training_flags(model, eval_mode=True):
        first = _one_run(model, args, kwargs, named, seed=1)
        second = _one_run(model, args, kwargs, named, seed=2)
    if [call.label for call in first] != [call.label for call in second]:
        parted = [one.label for one, other in zip(first, second, strict=False) if one.label != other.label]
        longer = first if len(first) > len(second) else second
        diverged = parted[0] if parted else longer[min(len(first), len(second))].label
        note = f"the two forwards ran different modules, from {diverged!r} on: control flow drawn at random"
        return [Finding("", type(model).__name__, "nondeterministic", math.nan, "the same", None, note)]
    random = [
        (one, other)
        for one, other in zip(first, second, strict=True)
        if _same(one.inputs, other.inputs, rtol) and not _same(one.outputs, other.outputs, rtol)
    ]
    findings = []
    for one, other in random:
        if any(inside_of(inner.name, one.name) for inner, _ in random):
            continue  # a block holding a random layer: that layer is named
        # how far apart: the largest relative change of a fingerprint
        change = max(
            (
                abs(a - b) / max(abs(a), abs(b), 1e-30)
                for x, y in zip(one.outputs, other.outputs, strict=False)
                for a, b in zip(x, y, strict=True)
            ),
            default=math.nan,
        )
        where = f"{one.type}.forward's own code" if any(inside_of(c.name, one.name) for c in first) else "it"
        note = (
            f"in eval mode its output changes from one forward of the same input to the next, "
            f"drawn at random in {where}: dropout left on (F.dropout without "
            f"training=self.training) or noise without a train-mode guard?"
        )
        findings.append(Finding(one.label, one.type, "nondeterministic", change, "the same", None, note))
    return findings


def check_deterministic(model: nn.Module, input: Any, **options: Any) -> None:
    """Raise :class:`~pytest_modelhooks.checks.HealthError` naming every layer whose eval-mode
    output changes from one forward of the same input to the next
    (:func:`nondeterministic_layers`, same arguments).

    >>> check_deterministic(nn.Sequential(nn.Linear(4, 4), nn.Dropout()), torch.randn(3, 4))
    """
    __tracebackhide__ = True
    raise_for(nondeterministic_layers(model, input, **options), "eval determinism")
