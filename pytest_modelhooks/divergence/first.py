"""Where two runs of a model part: the first module, in execution order, whose output differs
beyond tolerance while its inputs agree, and the innermost such module inside it.

Against bf16/fp16 autocast, channels_last, CUDA or another model of the same structure, each
module is run again on the reference run's own inputs (isolated): rounding that builds up over
a deep network blames no layer (a block is named only where it still differs once the modules
inside it return the reference values), a layer wrong in itself (a ``.half()`` that overflows)
is named.
Against the compiled model or the same model run again (dropout left on), both runs are
recorded whole and compared call by call. Against stored fingerprints, each call's numbers are
compared with those a snapshot pinned.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from pytest_modelhooks._torch import dynamo_quiet
from pytest_modelhooks._tree import default_tolerances, map_tensors, tensor_leaves
from pytest_modelhooks.divergence.calls import Call, fresh_caches, record_calls
from pytest_modelhooks.divergence.prints import Fingerprints, compare_prints
from pytest_modelhooks.errors import describe
from pytest_modelhooks.findings import Finding, HealthError, format_findings
from pytest_modelhooks.hooks.state import preserve_training_flags
from pytest_modelhooks.inputs import check_model, with_forward_kwargs
from pytest_modelhooks.tracing.state import (
    buffers_kept,
    calibrate_batch_norms,
    rng_kept,
    untrained_batch_norms,
)

__all__ = ["AGAINST", "Difference", "check_same", "difference", "first_divergence"]

#: what ``against=`` takes by name
AGAINST = ("compiled", "bf16", "fp16", "channels_last", "cuda", "again")


@dataclass(frozen=True)
class Difference:
    """How two outputs differ: the largest and mean absolute difference, and whether beyond
    tolerance (or of another structure, shape or finiteness)."""

    beyond: bool
    max: float
    mean: float
    detail: str = ""


def difference(
    reference: Any, other: Any, rtol: float | None, atol: float | None, precision: torch.dtype | None = None
) -> Difference:
    """Leaf by leaf, each within ``atol + rtol * max|reference|`` (tolerances per dtype by
    default, those of ``torch.testing.assert_close``; of ``precision`` where given: an
    autocast run's float32 output, a LayerNorm's or a bias added last, holds bf16 rounding)."""
    want, got = list(tensor_leaves(reference)), list(tensor_leaves(other))
    if [path for path, _ in want] != [path for path, _ in got]:
        return Difference(True, math.inf, math.inf, "the outputs have another structure")
    worst, means, beyond, detail = 0.0, [], False, ""
    for (path, one), (_, two) in zip(want, got, strict=True):
        if one.shape != two.shape:
            shapes = f"output{path} {tuple(one.shape)} vs {tuple(two.shape)}"
            return Difference(True, math.inf, math.inf, shapes)
        if not (one.is_floating_point() or one.is_complex()):
            if not torch.equal(one.cpu(), two.cpu()):
                beyond, detail = True, f"output{path}: integer values differ"
            continue
        a, b = one.detach().double().cpu(), two.detach().double().cpu()
        if a.numel() == 0:
            continue
        # the lower precision of the two sets the tolerance (a bf16 output against a float32 one)
        dtype = precision or (two.dtype if two.dtype != one.dtype else one.dtype)
        # torch.testing's, here relative to the reference's largest value: rounding scales with it
        default_rtol, default_atol = default_tolerances(dtype)
        relative = default_rtol if rtol is None else rtol
        absolute = default_atol if atol is None else atol
        both_nan = a.isnan() & b.isnan()
        diff = torch.where(both_nan, torch.zeros_like(a), (a - b).abs())
        diff = diff.nan_to_num(math.inf, math.inf, math.inf)
        scale = float(a.abs().nan_to_num(0, 0, 0).max())
        allowed = absolute + relative * scale
        if float(diff.max()) > allowed:
            beyond = True
            if not detail:
                nonfinite = int((~b.isfinite() & a.isfinite()).sum())
                detail = f"output{path}: {nonfinite} value(s) not finite" if nonfinite else ""
        worst = max(worst, float(diff.max()))
        means.append(float(diff[diff.isfinite()].mean()) if bool(diff.isfinite().any()) else math.inf)
    return Difference(beyond, worst, max(means) if means else 0.0, detail)


Context = Callable[[], AbstractContextManager[Any]]
#: how a tensor of the reference inputs is converted for the variant a module runs again on
Convert = Callable[[torch.Tensor], torch.Tensor]
#: The dtype each autocast comparison runs in: its rounding sets the tolerance.
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _variant(against: Any, model: nn.Module) -> tuple[nn.Module, Context, Convert | None]:
    """For an isolated comparison: the model to run each module of, the context to run it in,
    and how to convert each tensor of the reference inputs for it (None: as they are)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if against in AUTOCAST:
        dtype = AUTOCAST[against]
        return model, lambda: torch.autocast(device.type, dtype=dtype), None
    if against == "channels_last":
        converted = copy.deepcopy(model).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return (
            converted,
            nullcontext,
            lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t,
        )
    if against == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("against='cuda': CUDA is not available here")
        return copy.deepcopy(model).cuda(), nullcontext, lambda t: t.cuda()
    assert isinstance(against, nn.Module)
    return against, nullcontext, None


def _rerun(call: Call, model: nn.Module, context: Context, convert: Convert | None) -> Any:
    module = model.get_submodule(call.name) if call.name else model
    args, kwargs = fresh_caches(call.args, convert), fresh_caches(call.kwargs, convert)
    if convert is not None:  # (the tensors in a cache are converted with its copy)
        args, kwargs = map_tensors(args, convert), map_tensors(kwargs, convert)
    with context(), torch.no_grad():
        return module(*args, **kwargs)


@dataclass
class _Search:
    """What the isolated search carries: the recorded calls, the variant and how to run a
    module in it, the tolerance, the origins found, and the variant's outputs of the calls
    looked at (a parent's stand-ins for its children take their dtype, device and layout)."""

    calls: list[Call]
    variant: Any
    other: nn.Module
    context: Context
    convert: Convert | None
    tolerance: tuple[float | None, float | None, torch.dtype | None]
    origins: list[tuple[Call, Difference]] = field(default_factory=list)
    outputs: dict[int, Any] = field(default_factory=dict)


def _isolated(
    calls: list[Call], variant: Any, model: nn.Module, rtol: float | None, atol: float | None
) -> list[tuple[Call, Difference]]:
    """Top down from the model's call: a module whose output (from the reference inputs)
    differs is searched for the innermost children that differ too; those with none are the
    origins, in execution order."""
    other, context, convert = _variant(variant, model)
    precision = AUTOCAST.get(variant) if isinstance(variant, str) else None
    search = _Search(calls, variant, other, context, convert, (rtol, atol, precision))
    for index, call in enumerate(calls):
        if call.parent is None:
            _visit(search, index)
            search.outputs.clear()
    order = {id(call): index for index, call in enumerate(calls)}
    return sorted(search.origins, key=lambda pair: order[id(pair[0])])


def _visit(search: _Search, index: int) -> bool:
    """Whether ``calls[index]`` differs; appends it to the origins when none of its children
    does and its own code parts the runs. (A function, not a closure that calls itself: that
    closure is a reference cycle holding every recorded output until a garbage collection.)"""
    call = search.calls[index]
    if isinstance(search.variant, nn.Module) and call.name and not _has(search.other, call.name):
        return False
    output = _rerun(call, search.other, search.context, search.convert)
    search.outputs[index] = output
    found = difference(call.output, output, *search.tolerance)
    if not found.beyond:
        return False
    children = [_visit(search, child) for child in call.children]
    # every child looked at, none differs: the module's own code parts the runs, unless it
    # agrees once its children return the reference values (their roundings built up)
    if not any(children) and not _accumulated(search, index):
        search.origins.append((call, found))
    for child in call.children:  # (held only while their parent is judged)
        search.outputs.pop(child, None)
    return True


def _accumulated(search: _Search, index: int) -> bool:
    """Whether ``calls[index]`` differs only by what its children pass on, each within
    tolerance: its own code run again, each child standing in with the reference run's values
    in the dtype, device and layout of the child's output in the variant (so that the parent
    takes the path it takes there: a ``.half()`` it applies still overflows), agrees. The
    children are not run again. False where that cannot be told (no children, one not looked
    at or missing from the other model)."""
    call = search.calls[index]
    if not call.children or not all(child in search.outputs for child in call.children):
        return False
    queued: dict[str, list[Any]] = {}
    for child in call.children:
        reference, formed = search.calls[child].output, search.outputs[child]
        queued.setdefault(search.calls[child].name, []).append(_in_form(reference, formed))
    if any(stand_in is None for stand_ins in queued.values() for stand_in in stand_ins):
        return False
    with _standing_in(search.other, queued) as fits:
        output = _rerun(call, search.other, search.context, search.convert)
    return fits[0] and not difference(call.output, output, *search.tolerance).beyond


def _in_form(reference: Any, formed: Any) -> Any:
    """``reference``'s values in ``formed``'s structure, dtypes, devices and layouts; None
    where their leaves do not pair up."""
    values = [tensor for _, tensor in tensor_leaves(reference)]
    shapes = [tensor.shape for _, tensor in tensor_leaves(formed)]
    if [value.shape for value in values] != shapes:
        return None
    values.reverse()
    return map_tensors(formed, lambda given: torch.empty_like(given).copy_(values.pop()))


@contextmanager
def _standing_in(model: nn.Module, queued: dict[str, list[Any]]) -> Iterator[list[bool]]:
    """Each named module of ``model`` returns its queued outputs in turn instead of running;
    yields a flag that turns False where one is called more often than it has outputs. The
    modules' own ``forward`` (an instance's, where one was set) is put back after."""
    fits = [True]
    saved: list[tuple[nn.Module, Any]] = []

    def stand_in(outputs: list[Any], *args: Any, **kwargs: Any) -> Any:
        if not outputs:
            fits[0] = False
            return None
        return outputs.pop(0)

    try:
        for name, outputs in queued.items():
            module = model.get_submodule(name)
            saved.append((module, vars(module).get("forward")))
            module.forward = partial(stand_in, outputs)
        yield fits
    finally:
        for module, forward in saved:
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _paired(
    first: list[Call], second: list[Call], rtol: float | None, atol: float | None
) -> list[tuple[Call, Difference]]:
    """Two whole runs, call by call: a call *starts* a difference when its output differs while
    its inputs agree; the origins are those that start one with no call inside them starting
    one, in execution order."""
    others = {call.key: call for call in second}
    starts: dict[int, Difference] = {}
    for index, call in enumerate(first):
        twin = others.get(call.key)
        if twin is None:
            continue
        found = difference(call.output, twin.output, rtol, atol)
        if (
            found.beyond
            and not difference((call.args, call.kwargs), (twin.args, twin.kwargs), rtol, atol).beyond
        ):
            starts[index] = found

    # a start with a start below it is not the first: every ancestor of a start is marked
    # (a loop rather than a closure that calls itself, which would be a reference cycle
    # holding the recorded outputs until a garbage collection)
    above_a_start: set[int] = set()
    for index in starts:
        parent = first[index].parent
        while parent is not None and parent not in above_a_start:
            above_a_start.add(parent)
            parent = first[parent].parent
    return [(first[index], found) for index, found in starts.items() if index not in above_a_start]


def _finding(model: nn.Module, call: Call, found: Difference, against: str, chain: str) -> Finding:
    where = f" (call {call.index + 1})" if call.index else ""
    detail = f"; {found.detail}" if found.detail else ""
    note = (
        f"against {against}: its output differs while its inputs agree{where}: max |diff| "
        f"{found.max:.4g}, mean {found.mean:.4g}{detail}" + (f"; inside {chain}" if chain else "")
    )
    kind = type(call.module).__name__
    return Finding(call.name, kind, "diverges", found.max, "within tolerance", None, note)


def _chain(calls: list[Call], call: Call) -> str:
    names = []
    parent = call.parent
    while parent is not None and calls[parent].name:
        names.append(calls[parent].name)
        parent = calls[parent].parent
    return " > ".join(reversed(names))


def _describe(against: Any) -> str:
    if isinstance(against, nn.Module):
        return f"another {type(against).__name__}"
    return str(against)


def first_divergence(
    model: nn.Module,
    *inputs: Any,
    against: Any,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    backend: str = "inductor",
    **forward_kwargs: Any,
) -> list[Finding]:
    """Where ``model(*inputs)`` and its counterpart part: one
    :class:`~pytest_modelhooks.findings.Finding` per module whose output differs beyond
    tolerance while its inputs agree and none of its children's does, in execution order (the
    first is where it starts; ``note`` names the modules it is inside), with the max and mean
    difference. Empty: they agree.

    ``against`` is ``"bf16"``/``"fp16"`` (autocast), ``"channels_last"``, ``"cuda"``, another
    model of the same structure (a refactor; modules matched by name), each module run again
    on the reference run's inputs; ``"compiled"`` (``torch.compile`` with ``backend``) or
    ``"again"`` (the same model, a second run: chance in eval mode), both runs compared call by
    call; or fingerprints stored by :func:`fingerprints`. Tolerances default per dtype (those of
    ``torch.testing.assert_close``, relative to each output's largest value). Eval mode (but
    ``"again"`` runs the modules in their own modes), no grad, the RNG seeded for each run and
    put back; buffers put back.

    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> first_divergence(net, torch.randn(3, 4), against="bf16")
    []
    """
    model = check_model(model)
    args, kwargs = with_forward_kwargs(model, tuple(inputs), {}, forward_kwargs, "first_divergence")
    if not (isinstance(against, (nn.Module, Fingerprints)) or against in AGAINST):
        raise ValueError(
            f"against must be one of {', '.join(map(repr, AGAINST))}, a model of the same structure, or "
            f"stored Fingerprints, got against={describe(against)}"
        )
    with ExitStack() as stack:
        stack.enter_context(rng_kept(model))
        # eval mode, so that dropout draws no mask a rerun or a compiled run would draw otherwise;
        # "again" keeps the model's own modes: chance is what it looks for
        again = against == "again" or against is model
        stack.enter_context(preserve_training_flags(model, eval_mode=not again))
        stack.enter_context(buffers_kept(model))
        if isinstance(against, nn.Module) and against is not model:
            stack.enter_context(preserve_training_flags(against, eval_mode=True))
            stack.enter_context(buffers_kept(against))
        if not again and not isinstance(against, Fingerprints):
            _calibrated(model, against, args, kwargs)
        torch.manual_seed(seed)
        calls = record_calls(model, args, kwargs)
        if isinstance(against, Fingerprints):
            return compare_prints(model, calls, against, rtol, atol)
        if against in ("compiled", "again") or against is model:
            torch.manual_seed(seed + (0 if against == "compiled" else 1))
            if against == "compiled":
                # dynamo's caches reset before and after: this compile leaves nothing behind
                with dynamo_quiet():
                    second = record_calls(model, args, kwargs, run=torch.compile(model, backend=backend))
            else:
                second = record_calls(model, args, kwargs)
            origins = _paired(calls, second, rtol, atol)
        else:
            origins = _isolated(calls, against, model, rtol, atol)
    named = _describe(against if against is not model else "again")
    return [_finding(model, call, found, named, _chain(calls, call)) for call, found in origins]


def _calibrated(model: nn.Module, against: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Batch norms that never saw a batch take the statistics of this one (their buffers are
    put back by the caller): in eval mode at init they normalise nothing, a deep network's
    values grow (to the hundreds in timm's Visformer, to 1e11 in its Inception-v3), and any
    rounding then parts the runs.
    Another model's untrained norms of the same name take the reference's statistics, as a
    checkpoint loaded into both would give them."""
    if not untrained_batch_norms(model):
        return  # (nothing to calibrate: no cache copied for it)
    names = calibrate_batch_norms(model, fresh_caches(args), fresh_caches(kwargs))
    if not names or not isinstance(against, nn.Module) or against is model:
        return
    theirs = dict(untrained_batch_norms(against))
    with torch.no_grad():
        for name in names:
            mine, other = model.get_submodule(name), theirs.get(name)
            if other is None:
                continue
            for key, buffer in mine.named_buffers():
                target = getattr(other, key, None)
                if isinstance(target, torch.Tensor) and target.shape == buffer.shape:
                    target.copy_(buffer)


def check_same(model: nn.Module, *inputs: Any, against: Any, **options: Any) -> None:
    """Raise :class:`~pytest_modelhooks.findings.HealthError` where the model and ``against``
    part (:func:`first_divergence`), the first module first.

    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    >>> check_same(net, torch.randn(2, 3, 8, 8), against="channels_last")
    """
    __tracebackhide__ = True
    found = first_divergence(model, *inputs, against=against, **options)
    if found:
        first = found[0]
        headline = (
            f"runs part against {_describe(against)}: first at {first.layer or '(model)'} "
            f"({first.layer_type}), {len(found)} module(s) where a difference starts"
        )
        raise HealthError(headline + "\n" + format_findings(found, unit=""), found)
