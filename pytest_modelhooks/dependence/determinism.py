"""Chance in eval mode: the module whose output changes between two forwards of the same input
(dropout left on, unguarded noise, control flow decided by a draw).
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from pytest_modelhooks._torch import TorchDispatchMode, draws_at_random, overload_packet
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
    """Per tensor: its sum, norm, max |x| and size, on its device (read once per run, see
    :func:`_read`): a different draw of dropout or noise changes them. Integer tensors (token
    ids, labels) too: an id drawn at random upstream changes what an embedding is given. Taken
    as the tensor is made, before later in-place ops."""
    prints = []
    for _, tensor in tensor_leaves(obj):
        if tensor.is_meta or tensor.is_nested or tensor.numel() == 0:
            continue
        values = (torch.view_as_real(tensor) if tensor.is_complex() else tensor).detach()
        if values.dtype not in (torch.float32, torch.float64):
            values = values.float()
        low, high = torch.aminmax(values)
        # float32 sums: the same input gives the same sum (one reduction order), and a draw
        # of dropout moves it far beyond rtol; float64 ones read ~3x slower on a CPU
        size = torch.tensor(float(values.numel()), device=values.device)
        prints.append(
            torch.stack([values.sum(), torch.linalg.vector_norm(values), torch.maximum(-low, high), size])
        )
    return prints


def _read(prints: list[torch.Tensor]) -> Prints:
    return [tuple(row) for row in torch.stack(prints).tolist()] if prints else []


def _close(a: float, b: float, scale: float, rtol: float) -> bool:
    return abs(a - b) <= rtol * scale or (math.isnan(a) and math.isnan(b))


def _same(first: Prints, second: Prints, rtol: float) -> bool:
    """Whether two calls' fingerprints agree within ``rtol``. A sum is compared at the scale of
    the values it adds up (norm x sqrt(size)): a LayerNorm's output sums to ~0, and float noise
    on a sum of ~0 is no change."""
    if len(first) != len(second):
        return False
    for (sum_a, norm_a, max_a, size_a), (sum_b, norm_b, max_b, size_b) in zip(first, second, strict=True):
        scale = max(norm_a, norm_b) * math.sqrt(max(size_a, size_b))
        if not (
            size_a == size_b
            and _close(sum_a, sum_b, scale, rtol)
            and _close(norm_a, norm_b, max(norm_a, norm_b), rtol)
            and _close(max_a, max_b, max(max_a, max_b), rtol)
        ):
            return False
    return True


class _Draws(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Notes each op that draws from a random generator, with the module running it."""

    def __init__(self, running: list[str]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.running = running  # the modules' names, outermost first
        self.drawn: dict[str, str] = {}  # innermost module -> the first op it drew with
        self._random: dict[Any, bool] = {}

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        random = self._random.get(func)
        if random is None:
            random = self._random[func] = draws_at_random(func)
        if random and self.running:
            self.drawn.setdefault(self.running[-1], str(overload_packet(func).__name__))
        return func(*args, **(kwargs or {}))


def _one_run(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    named: list[tuple[str, nn.Module]],
    seed: int,
    draws: dict[str, str] | None = None,
) -> list[_Printed]:
    """One eval forward, every call fingerprinted; with ``draws``, also note there which
    modules drew at random (their innermost name -> the op)."""

    def enter(call_args: Any, call_kwargs: Any) -> tuple[Any, Any, Any]:
        return call_args, call_kwargs, _fingerprint((call_args, call_kwargs))

    # the generators of every device the model or its input is on, forked: restored after
    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    devices |= {t.device for _, t in tensor_leaves((args, kwargs))}
    cuda = sorted({device.index or 0 for device in devices if device.type == "cuda"})
    with ExitStack() as stack:
        log = stack.enter_context(CallLog(named, enter, _fingerprint))
        stack.enter_context(torch.random.fork_rng(devices=cuda))
        stack.enter_context(torch.no_grad())
        if draws is not None:
            mode = stack.enter_context(_Draws(log.running))  # the log knows what runs
        torch.manual_seed(seed)  # each run its own draw: chance shows as a difference
        model(*args, **kwargs)
    if draws is not None:
        draws.update(mode.drawn)
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

    The forward runs twice in eval mode under ``no_grad``, torch's generators seeded
    differently each time (and restored after). During the first, every op that draws from a
    random generator is seen as it runs, and the innermost module running it is named, however
    rarely the draw changes anything (a label dropped with probability 0.1); then every
    module's inputs and outputs, fingerprinted as they are made (sum, norm, max, size; integer
    tensors too), are compared between the runs, and the innermost module whose inputs agree
    while its output does not is named too (chance from outside torch: Python's ``random``,
    NumPy). Dropout left on (``F.dropout(x, p)`` without ``training=self.training``), noise
    drawn in the forward without a train-mode guard. Values within ``rtol`` agree (on a GPU,
    some kernels are not bitwise reproducible), a sum at the scale of what it adds up. The
    model is left as it was: no hooks, the same flags.

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
    draws: dict[str, str] = {}
    with preserve_training_flags(model, eval_mode=True):
        first = _one_run(model, args, kwargs, named, seed=1, draws=draws)
        second = _one_run(model, args, kwargs, named, seed=2)
    modules = dict(named)
    drawn = [_drawn(name, modules.get(name, model), op) for name, op in draws.items()]
    if [call.label for call in first] != [call.label for call in second]:
        parted = [one.label for one, other in zip(first, second, strict=False) if one.label != other.label]
        longer = first if len(first) > len(second) else second
        diverged = parted[0] if parted else longer[min(len(first), len(second))].label
        note = f"the two forwards ran different modules, from {diverged!r} on: control flow drawn at random"
        if "" in draws:  # the model's own code drew: one finding for it, saying both
            note += f" (its forward draws from torch's random generator: {draws['']})"
        diverging = Finding("", type(model).__name__, "nondeterministic", math.nan, "the same", None, note)
        return [*(finding for finding in drawn if finding.layer), diverging]
    return _compared(first, second, draws, drawn, rtol)


def _compared(
    first: list[_Printed], second: list[_Printed], draws: dict[str, str], drawn: list[Finding], rtol: float
) -> list[Finding]:
    """The draws seen, then each innermost module whose output changed between the two runs
    while its inputs did not (the draws' findings get the measured change)."""
    random = [
        (one, other)
        for one, other in zip(first, second, strict=True)
        if _same(one.inputs, other.inputs, rtol) and not _same(one.outputs, other.outputs, rtol)
    ]
    findings = []
    for one, other in random:
        if any(inside_of(inner.name, one.name) for inner, _ in random):
            continue  # a block holding a random layer: that layer is named
        if any(inside_of(name, one.name) and name != one.name for name in draws):
            continue  # a block holding a layer seen drawing: that layer is named
        # how far apart: the largest relative change of a fingerprint
        change = max(
            (
                abs(a - b) / max(abs(a), abs(b), 1e-30)
                for x, y in zip(one.outputs, other.outputs, strict=False)
                for a, b in zip(x, y, strict=True)
            ),
            default=math.nan,
        )
        if one.name in draws:  # seen drawing, and its output changed: the draw's finding, measured
            seen = next(index for index, finding in enumerate(drawn) if finding.layer == one.name)
            drawn[seen] = replace(drawn[seen], observed=change)
            continue
        where = f"{one.type}.forward's own code" if any(inside_of(c.name, one.name) for c in first) else "it"
        note = (
            f"in eval mode its output changes from one forward of the same input to the next, "
            f"drawn at random in {where}: dropout left on (F.dropout without "
            f"training=self.training) or noise without a train-mode guard?"
        )
        findings.append(Finding(one.label, one.type, "nondeterministic", change, "the same", None, note))
    return [*drawn, *findings]


def _drawn(name: str, module: nn.Module, op: str) -> Finding:
    kind = type(module).__name__
    where = f"{kind}.forward's own code" if next(module.children(), None) is not None else "it"
    note = (
        f"in eval mode it draws from torch's random generator ({op}): drawn at random in {where}: "
        f"dropout left on (F.dropout without training=self.training), noise or a random choice "
        f"without a train-mode guard? The draw itself was seen, whatever its probability"
    )
    return Finding(name, kind, "nondeterministic", math.nan, "the same", None, note)


def check_deterministic(model: nn.Module, input: Any, **options: Any) -> None:
    """Raise :class:`~pytest_modelhooks.findings.HealthError` naming every layer whose eval-mode
    output changes from one forward of the same input to the next
    (:func:`nondeterministic_layers`, same arguments).

    >>> check_deterministic(nn.Sequential(nn.Linear(4, 4), nn.Dropout()), torch.randn(3, 4))
    """
    __tracebackhide__ = True
    raise_for(nondeterministic_layers(model, input, **options), "eval determinism")
