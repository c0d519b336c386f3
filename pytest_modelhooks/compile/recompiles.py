"""Recompilations: the inputs at which ``torch.compile`` compiles the model again, and the guard
that failed each time, named at the module whose code it guards.

A compiled function keeps guards on what it was compiled for (each input's sizes, dtype,
whether the model is training). A call that fails them compiles again; past
``torch._dynamo.config.recompile_limit`` compiles, the function runs eagerly for good. A size
that should be dynamic recompiles (``size mismatch at index 0. expected 2, actual 5``); a size
marked dynamic that the code specialises (``if x.shape[0] == 5``) fails to compile.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pytest_modelhooks._torch import dynamo_quiet, dynamo_shapes, recompilations, recompile_limit
from pytest_modelhooks._tree import tensor_leaves
from pytest_modelhooks.compile.dynamic import Dynamic, dynamic_marks, marked, torch_flag
from pytest_modelhooks.compile.places import (
    Spans,
    frames_in_text,
    layer_label,
    model_kept,
    place_code,
    spans,
    where,
)
from pytest_modelhooks.findings import Finding
from pytest_modelhooks.inputs import (
    check_model,
    forward_parameter_names,
    normalise_input,
    with_forward_kwargs,
)

__all__ = ["compile_failure", "describe_call", "raise_if_unfit", "recompiles"]

_SIZE_MISMATCH = re.compile(r"tensor '([^']+)' size mismatch at index (\d+)")
#: a guard dynamo added where the code read a dynamic size: ``expr  # source  # file:line in f``
_GUARD_SOURCE = re.compile(r"#\s*(?P<source>.*?)\s*#\s*(?P<file>\S+):(?P<line>\d+) in \w+")


def describe_call(model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    """The tensors of one call by name and shape: ``x (5, 16)``."""
    names = forward_parameter_names(model)
    parts = []
    for index, value in enumerate(args):
        root = names[index] if index < len(names) else f"args[{index}]"
        parts += [f"{root}{path} {tuple(t.shape)}" for path, t in tensor_leaves(value)]
    for key, value in kwargs.items():
        parts += [f"{key}{path} {tuple(t.shape)}" for path, t in tensor_leaves(value)]
    return ", ".join(parts) or "no tensor"


def _file_named(shown: str, classes: Spans) -> str | None:
    """The source file a guard's shortened path (``mp/rc.py``) stands for."""
    for path, _, _ in classes.values():
        if path.endswith(shown.lstrip(".")) or path.endswith(os.sep + os.path.basename(shown)):
            return path
    return None


def _recompile_finding(
    model: nn.Module, code: Any, reasons: list[str], call: int, shapes: str, dynamic: Dynamic, classes: Spans
) -> Finding:
    reason = reasons[0].split(":", 1)[-1].strip() if reasons else "dynamo gave no reason"
    reason = re.sub(r"\s+", " ", reason)
    names = place_code(model, code.co_filename, code.co_firstlineno, classes)
    hint = ""
    guard = _GUARD_SOURCE.search(reason)
    if guard:  # a guard from the model's code reading a dynamic size: placed at that line
        path = _file_named(guard["file"], classes)
        if path is not None:
            names = place_code(model, path, int(guard["line"]), classes)
            expression = reason[: guard.start()].strip()
            reason = f"{expression}, guarded at {where(path, int(guard['line']))} `{guard['source']}`"
        hint = "the code specialised a dynamic size: read it as a tensor op, not a Python int"
    elif mismatch := _SIZE_MISMATCH.search(reason):
        name, index = mismatch[1], int(mismatch[2])
        position = re.fullmatch(r"args\[(\d+)\]", name)  # a forward taking *args
        key = int(position[1]) if position else name
        if dynamic is None and index == 0:
            hint = "dynamic='batch' marks the batch dynamic from the first compile"
        else:
            hint = f"dynamic={{{key!r}: {index}}} marks that size dynamic"
    module = model.get_submodule(names[0]) if names[0] else model
    note = f"compiled again for {shapes}: guard failed: {reason}" + (f" (hint: {hint})" if hint else "")
    return Finding(layer_label(names), type(module).__name__, "recompile", 1.0, "0", call, note)


def compile_failure(
    model: nn.Module, error: BaseException, call: int | None, classes: Spans
) -> Finding | None:
    """A compile that failed for a reason of the model's, as a finding (None: not one): a size
    marked dynamic that the code specialises. The user frame the error names places it."""
    if not any(kind.__name__ == "ConstraintViolationError" for kind in type(error).__mro__):
        return None
    text = str(error)
    bullet = next((line.strip(" -") for line in text.splitlines() if line.strip().startswith("- ")), "")
    frames = [
        frame
        for frame in frames_in_text(text)
        if place_code(model, frame.filename, frame.lineno or 0, classes) != [""]
    ]
    names, location = [""], ""
    if frames:
        last = frames[-1]
        names = place_code(model, last.filename, last.lineno or 0, classes)
        location = f"{where(last.filename, last.lineno)} `{last.line}`: "
    detail = bullet.split(". If you", 1)[0] or text.splitlines()[0]
    module = model.get_submodule(names[0]) if names[0] else model
    note = f"{location}{detail} (hint: leave it static, or compute with the size as a tensor)"
    return Finding(layer_label(names), type(module).__name__, "specialized", 1.0, "dynamic", call, note)


def recompiles(
    model: nn.Module,
    *calls: Any,
    dynamic: Dynamic = None,
    backend: str = "eager",
    **forward_kwargs: Any,
) -> list[Finding]:
    """Compile the model once (``torch.compile(model, backend=backend)`` with ``dynamic``) and
    call it on each of ``calls`` in turn (a tensor, a tuple of positional inputs or a dict of
    keyword inputs each): one :class:`~pytest_modelhooks.findings.Finding` per recompilation,
    at the module whose code was compiled again, with the call (``batch``, counted from 0),
    its shapes and the guard that failed; one ``"specialized"`` finding where a size marked
    dynamic is specialised by the code, and one ``"recompile limit"`` where dynamo gave up and
    runs the model eagerly. ``backend="eager"`` traces without generating code: the guards are
    dynamo's, and the check takes a fraction of an inductor compile.

    >>> import torch
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    >>> [f.note.split(":")[0] for f in recompiles(net, torch.randn(2, 4), torch.randn(5, 4))]
    ['compiled again for input (5, 4)']
    >>> recompiles(net, torch.randn(2, 4), torch.randn(5, 4), dynamic="batch")
    []
    """
    model = check_model(model)
    if not calls:
        raise ValueError("recompiles needs the inputs of one call or more, got none")
    prepared = []
    for index, call in enumerate(calls):
        args, kwargs = normalise_input(call, f"calls[{index}]", model)
        prepared.append(with_forward_kwargs(model, args, kwargs, forward_kwargs, "recompiles"))
    classes = spans(model)
    found: list[Finding] = []
    compiles: dict[Any, int] = {}
    given_up: dict[Any, int] = {}  # code -> the call from which dynamo runs it eagerly
    with model_kept(model), dynamo_quiet(), dynamo_shapes(torch_flag(dynamic)), recompilations() as seen:
        compiled = torch.compile(model, backend=backend)
        for index, (args, kwargs) in enumerate(prepared):
            before = len(seen)
            with marked(dynamic_marks(model, dynamic, args, kwargs)):
                try:
                    compiled(*args, **kwargs)
                except Exception as error:
                    failure = compile_failure(model, error, index, classes)
                    if failure is None:
                        raise_if_unfit(model, error, f"calls[{index}]", args, kwargs)
                        raise
                    found.append(failure)
                    break
            shapes = describe_call(model, args, kwargs)
            for code, reasons in seen[before:]:
                compiles[code] = compiles.get(code, 1) + 1
                if compiles[code] > recompile_limit():
                    given_up.setdefault(code, index)  # dynamo runs it eagerly: said once, below
                    continue
                found.append(_recompile_finding(model, code, reasons, index, shapes, dynamic, classes))
    for code, index in given_up.items():
        names = place_code(model, code.co_filename, code.co_firstlineno, classes)
        module = model.get_submodule(names[0]) if names[0] else model
        note = (
            f"dynamo compiled this code {recompile_limit()} times and runs it eagerly from this call "
            "on (torch._dynamo.config.recompile_limit): mark the sizes that change dynamic"
        )
        label, kind = layer_label(names), type(module).__name__
        found.append(Finding(label, kind, "recompile limit", 1.0, "0", index, note))
    return found


def raise_if_unfit(model: nn.Module, error: BaseException, argument: str, args: Any, kwargs: Any) -> None:
    """A call the compiled model fails on: when the eager forward fails on it too, the input
    does not fit the forward, and a ValueError says so, naming ``argument``."""
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as eager:
        raise ValueError(
            f"{argument} ({describe_call(model, args, kwargs)}) do not fit "
            f"{type(model).__name__}.forward: {type(eager).__name__}: {eager}"
        ) from eager
