"""Graph breaks: where ``torch.compile`` falls back to Python, named at the module whose code
it is in, with the file, the line and dynamo's reason.

dynamo reports each break with the user frames that led to it (the model's forward down to the
line that broke). Each frame is placed in the module class whose source holds it; from one
frame to the next, the instance is the child the calling line names (``self.inner(x)``), or,
where the call goes through a variable (``for block in self.blocks: x = block(x)``), every
instance of that class below the caller. The same break reached from several calls is one row
with a count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pytest_modelhooks._torch import dynamo_explain, dynamo_quiet, dynamo_shapes
from pytest_modelhooks.compile.dynamic import Dynamic, dynamic_marks, marked, torch_flag
from pytest_modelhooks.compile.places import (
    Spans,
    in_model,
    layer_label,
    model_kept,
    placed,
    readable_reason,
    spans,
    where,
)
from pytest_modelhooks.compile.recompiles import compile_failure, raise_if_unfit, recompiles
from pytest_modelhooks.findings import Finding, HealthError, format_findings
from pytest_modelhooks.inputs import check_model, with_forward_kwargs


def graph_breaks(
    model: nn.Module, *inputs: Any, dynamic: Dynamic = None, **forward_kwargs: Any
) -> list[Finding]:
    """Every place ``torch.compile`` breaks the model's graph on ``model(*inputs, **forward_kwargs)``,
    one :class:`~pytest_modelhooks.findings.Finding` per place: the qualified name and type of
    the module whose code it is in (``""``: the model's own forward), the number of breaks
    dynamo reports there (``observed``; a break inside a child module may count twice, the
    caller's graph splitting at the call too), and in the note the file and line, the source
    line, dynamo's reason and its hint. ``dynamic`` is ``torch.compile``'s (None, True, False),
    ``"batch"`` or a mapping of the inputs' dynamic dimensions (:mod:`.dynamic`): a size marked
    dynamic that the code specialises is a ``"specialized"`` finding. The forward runs (eagerly
    and compiled, on the model's device); buffers and the model's Python-side state are put
    back, and dynamo's caches and config are reset before and after.

    >>> import torch
    >>> class Chatty(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.proj = nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         if self.proj(x).sum() > 0:  # a branch on a value: the graph breaks here
    ...             return x
    ...         return -x
    >>> [(f.layer_type, f.statistic, int(f.observed)) for f in graph_breaks(Chatty(), torch.randn(2, 4))]
    [('Chatty', 'graph break', 1)]
    """
    model = check_model(model)
    args, kwargs = with_forward_kwargs(model, tuple(inputs), {}, forward_kwargs, "graph_breaks")
    classes = spans(model)
    marks = dynamic_marks(model, dynamic, args, kwargs)
    with model_kept(model), dynamo_shapes(torch_flag(dynamic)), marked(marks):
        try:
            explained, counted = dynamo_explain(model, *args, **kwargs)
        except Exception as error:
            failure = compile_failure(model, error, None, classes)
            if failure is None:
                raise_if_unfit(model, error, "inputs", args, kwargs)
                raise
            return [failure]
        # a break before the first op of a frame is in dynamo's counts, not in explain's list:
        # where dynamo broke, a full-graph compile stops at the first break and says where
        first = _first_break(model, args, kwargs) if sum(counted.values()) else None
    found = _listed(model, explained.break_reasons, classes)
    if first is not None:
        listed = {finding.note.split(" `", 1)[0] for finding in found}
        unlisted = _unlisted(model, first, classes, listed)
        if unlisted is not None:
            found.append(unlisted)
    if int(explained.graph_count) == 0:
        # dynamo skipped the whole forward (RNN modules, unless torch._dynamo.config.allow_rnn):
        # no break to list, and nothing compiled either
        note = (
            "torch.compile compiled no graph: dynamo skipped the forward and runs it eagerly "
            "(RNN modules are skipped unless torch._dynamo.config.allow_rnn = True)"
        )
        found.append(Finding("", type(model).__name__, "not compiled", 1.0, "a graph", None, note))
        return found
    unexplained = int(explained.graph_break_count) - len(explained.break_reasons)
    if unexplained > 0:
        note = (
            f"dynamo counted {unexplained} more break(s) without a reason or a place "
            f"(TORCH_LOGS=graph_breaks names them)"
        )
        found.append(Finding("", type(model).__name__, "graph break", float(unexplained), "0", None, note))
    return found


def _listed(model: nn.Module, reasons: list[Any], classes: Spans) -> list[Finding]:
    """A finding per place of the breaks explain lists: the module(s) and the line."""
    rows: dict[tuple[str, ...], list[Any]] = {}
    for reason in reasons:
        frames = list(reason.user_stack or [])
        innermost = frames[-1] if frames else None
        names = placed(model, frames, classes)
        sentence, hint = readable_reason(str(reason.reason))
        location = where(innermost.filename, innermost.lineno) if innermost is not None else "(no user frame)"
        source = (innermost.line or "").strip() if innermost is not None else ""
        # dynamo may report one break twice (its first account, then the frame it resumed):
        # a place is the module(s) and the line, its reason the first one given
        key = (*names, location)
        if key in rows:
            rows[key][0] += 1
        else:
            rows[key] = [1, names, location, source, sentence, hint]
    found = []
    for count, names, location, source, sentence, hint in rows.values():
        module = model.get_submodule(names[0]) if names[0] else model
        layer = layer_label(names)
        note = f"{location} `{source}`: {sentence}" + (f" (hint: {hint})" if hint else "")
        found.append(Finding(layer, type(module).__name__, "graph break", float(count), "0", None, note))
    return found


def _first_break(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> BaseException | None:
    """The error ``torch.compile(fullgraph=True)`` raises at the model's first graph break,
    whose stack says where it is (None: it compiled whole)."""
    with dynamo_quiet():
        try:
            torch.compile(model, fullgraph=True, backend="eager")(*args, **kwargs)
        except Exception as error:
            return error
    return None


def _unlisted(model: nn.Module, first: BaseException, classes: Spans, listed: set[str]) -> Finding | None:
    """The first break, from a full-graph compile's error, when explain did not list its place
    (None: it did, or it listed breaks and this one has no frame in the model's code)."""
    frames = list(getattr(first, "real_stack", None) or [])
    inside = [frame for frame in frames if in_model(frame.filename, frame.lineno, classes)]
    sentence, hint = readable_reason(str(first))
    names = placed(model, inside, classes)
    if inside:
        last = inside[-1]
        location = where(last.filename, last.lineno)
        if location in listed:
            return None
        place = f"{location} `{(last.line or '').strip()}`: "
    elif listed:
        return None
    else:
        place = "(no place given: the break is before the first op of a forward) "
    module = model.get_submodule(names[0]) if names[0] else model
    note = f"{place}{sentence}" + (f" (hint: {hint})" if hint else "")
    return Finding(layer_label(names), type(module).__name__, "graph break", 1.0, "0", None, note)


#: findings that fail a compile check whatever the bounds: nothing compiled, a dynamic size
#: specialised, dynamo given up on recompiling
_ALWAYS_FAIL = ("not compiled", "specialized", "recompile limit")


def _count(value: Any, argument: str, *, none: bool = False) -> None:
    if none and value is None:
        return
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        raise ValueError(f"{argument} must be a non-negative int, got {argument}={value!r}")


def check_compiles(
    model: nn.Module,
    *inputs: Any,
    max_graph_breaks: int = 0,
    max_recompiles: int | None = None,
    more_inputs: Sequence[Any] = (),
    dynamic: Dynamic = None,
    backend: str = "eager",
    **forward_kwargs: Any,
) -> list[Finding]:
    """Raise :class:`~pytest_modelhooks.findings.HealthError` when ``torch.compile`` breaks
    the model's graph more than ``max_graph_breaks`` times on ``model(*inputs)``
    (:func:`graph_breaks`), or, called again on each of ``more_inputs`` (a tensor, a tuple of
    positional inputs or a dict of keyword inputs each), recompiles more than
    ``max_recompiles`` times (:func:`~.recompiles.recompiles`; None: not bounded). A model
    dynamo does not compile at all, a size marked ``dynamic`` that the code specialises and a
    recompile limit reached fail whatever the bounds. The message has a row per place. A
    check that passes returns what it found within the bounds (a snapshot can pin it).

    >>> import torch
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    >>> batches = [torch.randn(5, 4), torch.randn(7, 4)]
    >>> check_compiles(net, torch.randn(2, 4), more_inputs=batches, dynamic="batch", max_recompiles=0)
    []
    """
    __tracebackhide__ = True
    _count(max_graph_breaks, "max_graph_breaks")
    _count(max_recompiles, "max_recompiles", none=True)
    if isinstance(more_inputs, (str, bytes)) or not isinstance(more_inputs, Sequence):
        raise TypeError(
            "more_inputs must be a sequence of inputs (a tensor, a tuple or a dict each), "
            f"got more_inputs={type(more_inputs).__name__}"
        )
    found = graph_breaks(model, *inputs, dynamic=dynamic, **forward_kwargs)
    if more_inputs and not any(finding.statistic == "specialized" for finding in found):
        calls = [tuple(inputs), *more_inputs]
        found += recompiles(model, *calls, dynamic=dynamic, backend=backend, **forward_kwargs)
    breaks = sum(int(finding.observed) for finding in found if finding.statistic == "graph break")
    again = sum(finding.statistic == "recompile" for finding in found)
    problems = []
    if breaks > max_graph_breaks:
        places = sum(finding.statistic == "graph break" for finding in found)
        problems.append(f"{breaks} graph break(s), {max_graph_breaks} allowed, in {places} place(s)")
    if max_recompiles is not None and again > max_recompiles:
        problems.append(f"{again} recompile(s), {max_recompiles} allowed")
    problems += [finding.statistic for finding in found if finding.statistic in _ALWAYS_FAIL]
    if problems:
        message = f"compile check failed: {'; '.join(problems)}\n" + format_findings(found, unit="call")
        raise HealthError(message, found)
    return found
