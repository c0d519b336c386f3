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

import inspect
import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

from torch import nn

from pytest_modelhooks._torch import dynamo_explain
from pytest_modelhooks.findings import Finding, HealthError, format_findings
from pytest_modelhooks.inputs import check_model
from pytest_modelhooks.tracing.state import buffers_kept, python_state_kept

_SELF_ATTRIBUTE = re.compile(r"\bself\.([A-Za-z_]\w*)")

#: dynamo's terse reasons, as a user would say them
_READABLE = {
    "generic_jump": "a Python branch on a tensor's value (`if`/`while` on a tensor)",
    "data dependent operator": "an op whose output shape depends on the values",
}


def _spans(model: nn.Module) -> dict[type, tuple[str, int, int]]:
    """Each module class of the model: its source file and first and last line."""
    spans: dict[type, tuple[str, int, int]] = {}
    for module in model.modules():
        kind = type(module)
        if kind in spans:
            continue
        try:
            path = inspect.getsourcefile(kind)
            lines, first = inspect.getsourcelines(kind)
        except (TypeError, OSError):  # built in C, or defined where no source is kept
            continue
        if path is not None:
            spans[kind] = (os.path.realpath(path), first, first + len(lines) - 1)
    return spans


def _owner(frame: Any, spans: dict[type, tuple[str, int, int]]) -> type | None:
    """The innermost module class whose source holds ``frame``'s line."""
    path = os.path.realpath(frame.filename)
    holding = [
        (last - first, kind)
        for kind, (file, first, last) in spans.items()
        if file == path and first <= (frame.lineno or 0) <= last
    ]
    return min(holding, key=lambda item: item[0])[1] if holding else None


def _below(root_name: str, root: nn.Module, kind: type) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []
    for name, module in root.named_modules():
        if type(module) is kind:
            found.append((f"{root_name}.{name}".strip(".") if name else root_name, cast(nn.Module, module)))
    return found


def _placed(model: nn.Module, frames: Sequence[Any], spans: dict[type, tuple[str, int, int]]) -> list[str]:
    """The qualified names of the module(s) whose code the innermost frame runs."""
    current: list[tuple[str, nn.Module]] = [("", model)]
    previous_line = ""
    for frame in frames:
        kind = _owner(frame, spans)
        if kind is None:  # a helper function: the module that called it keeps the blame
            continue
        if len(current) == 1 and type(current[0][1]) is kind:
            previous_line = frame.line or ""
            continue
        parent_name, parent = current[0]
        named = [
            (f"{parent_name}.{attribute}".strip("."), child)
            for attribute in _SELF_ATTRIBUTE.findall(previous_line)
            if isinstance(child := getattr(parent, attribute, None), nn.Module) and type(child) is kind
        ]
        candidates = named[:1] if named else [found for one in current for found in _below(*one, kind)]
        current = candidates or current
        previous_line = frame.line or ""
    return [name for name, _ in current]


def _reason(text: str) -> tuple[str, str]:
    """dynamo's reason as one sentence, and its hint."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    headline = lines[0] if lines else "graph break"
    for marker, readable in _READABLE.items():
        if headline.startswith(marker):
            headline = readable
    explanation = next(
        (line[len("Explanation:") :].strip() for line in lines if line.startswith("Explanation:")), ""
    )
    hints = [line[len("Hint:") :].strip() for line in lines if line.startswith("Hint:")]
    sentence = f"{headline}: {explanation}" if explanation else headline
    return sentence, " ".join(hint for hint in hints if "report an issue" not in hint.lower())


def _where(frame: Any) -> str:
    path = os.path.realpath(frame.filename)
    here = os.path.realpath(os.getcwd())
    shown = os.path.relpath(path, here) if path.startswith(here + os.sep) else path
    return f"{shown}:{frame.lineno}"


@contextmanager
def _model_kept(model: nn.Module) -> Iterator[None]:
    """The forward runs for real: buffers (BatchNorm's running statistics) and Python-side
    state go back after it."""
    modules = list(model.modules())
    names = [set(vars(module)) for module in modules]
    with buffers_kept(model), python_state_kept(modules):
        try:
            yield
        finally:
            # what dynamo marks a module with (``_is_torch_compile``) goes too
            for module, before in zip(modules, names, strict=True):
                for added in set(vars(module)) - before:
                    delattr(module, added)


def graph_breaks(model: nn.Module, *inputs: Any, **forward_kwargs: Any) -> list[Finding]:
    """Every place ``torch.compile`` breaks the model's graph on ``model(*inputs, **forward_kwargs)``,
    one :class:`~pytest_modelhooks.findings.Finding` per place: the qualified name and type of
    the module whose code it is in (``""``: the model's own forward), the number of breaks
    dynamo reports there (``observed``; a break inside a child module may count twice, the
    caller's graph splitting at the call too), and in the note the file and line, the source
    line, dynamo's reason and its hint. The forward runs (eagerly and compiled, on the model's
    device); buffers and the model's Python-side state are put back, and dynamo's caches are
    reset before and after.

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
    spans = _spans(model)
    with _model_kept(model):
        explained = dynamo_explain(model, *inputs, **forward_kwargs)
    rows: dict[tuple[str, ...], list[Any]] = {}
    for reason in explained.break_reasons:
        frames = list(reason.user_stack or [])
        innermost = frames[-1] if frames else None
        names = _placed(model, frames, spans)
        sentence, hint = _reason(str(reason.reason))
        where = _where(innermost) if innermost is not None else "(no user frame)"
        source = (innermost.line or "").strip() if innermost is not None else ""
        # dynamo may report one break twice (its first account, then the frame it resumed):
        # a place is the module(s) and the line, its reason the first one given
        key = (*names, where)
        if key in rows:
            rows[key][0] += 1
        else:
            rows[key] = [1, names, where, source, sentence, hint]
    found = []
    for count, names, where, source, sentence, hint in rows.values():
        module = model.get_submodule(names[0]) if names[0] else model
        layer = (
            names[0]
            if len(names) == 1
            else ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        )
        note = f"{where} `{source}`: {sentence}" + (f" (hint: {hint})" if hint else "")
        found.append(Finding(layer, type(module).__name__, "graph break", float(count), "0", None, note))
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


def check_compiles(model: nn.Module, *inputs: Any, max_graph_breaks: int = 0, **forward_kwargs: Any) -> None:
    """Raise :class:`~pytest_modelhooks.findings.HealthError` when ``torch.compile`` breaks
    the model's graph more than ``max_graph_breaks`` times, with a row per place
    (:func:`graph_breaks`).

    >>> import torch
    >>> check_compiles(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.randn(2, 4))
    """
    __tracebackhide__ = True
    if not (
        isinstance(max_graph_breaks, int) and not isinstance(max_graph_breaks, bool) and max_graph_breaks >= 0
    ):
        raise ValueError(
            f"max_graph_breaks must be a non-negative int, got max_graph_breaks={max_graph_breaks!r}"
        )
    found = graph_breaks(model, *inputs, **forward_kwargs)
    total = sum(int(finding.observed) for finding in found if math.isfinite(finding.observed))
    if total > max_graph_breaks:
        message = (
            f"compile check failed: {total} graph break(s), {max_graph_breaks} allowed, in "
            f"{len(found)} place(s)\n" + format_findings(found, unit="call")
        )
        raise HealthError(message, found)
