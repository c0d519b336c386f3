"""Where in the model a line of code is: a frame of the user's code placed in the module whose
forward runs it, by the source spans of the model's module classes, and dynamo's and export's
reasons as one readable sentence.

A frame is placed in the module class whose source holds it; from one frame to the next (outer
to inner), the instance is the child the calling line names (``self.inner(x)``), or, where the
call goes through a variable (``for block in self.blocks: x = block(x)``), every instance of
that class below the caller.
"""

from __future__ import annotations

import inspect
import linecache
import os
import re
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

from torch import nn

from pytest_modelhooks.tracing.state import buffers_kept, python_state_kept

__all__ = [
    "frames_in_text",
    "Spans",
    "layer_label",
    "model_kept",
    "place_code",
    "placed",
    "readable_reason",
    "spans",
    "where",
]

#: each module class of a model: its source file and first and last line
Spans = dict[type, tuple[str, int, int]]

_SELF_ATTRIBUTE = re.compile(r"\bself\.([A-Za-z_]\w*)")
_FRAME_LINE = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>[\w<>]+)')

#: dynamo's terse reasons, as a user would say them
_READABLE = {
    "generic_jump": "a Python branch on a tensor's value (`if`/`while` on a tensor)",
    "data dependent operator": "an op whose output shape depends on the values",
}


def spans(model: nn.Module) -> Spans:
    """Each module class of the model: its source file and first and last line."""
    found: Spans = {}
    for module in model.modules():
        kind = type(module)
        if kind in found:
            continue
        try:
            path = inspect.getsourcefile(kind)
            lines, first = inspect.getsourcelines(kind)
        except (TypeError, OSError):  # built in C, or defined where no source is kept
            continue
        if path is not None:
            found[kind] = (os.path.realpath(path), first, first + len(lines) - 1)
    return found


def _owner(path: str, line: int, classes: Spans) -> type | None:
    """The innermost module class whose source holds ``path:line``."""
    path = os.path.realpath(path)
    holding = [
        (last - first, kind)
        for kind, (file, first, last) in classes.items()
        if file == path and first <= line <= last
    ]
    return min(holding, key=lambda item: item[0])[1] if holding else None


def _below(root_name: str, root: nn.Module, kind: type) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []
    for name, module in root.named_modules():
        if type(module) is kind:
            found.append((f"{root_name}.{name}".strip(".") if name else root_name, cast(nn.Module, module)))
    return found


def placed(model: nn.Module, frames: Sequence[Any], classes: Spans) -> list[str]:
    """The qualified names of the module(s) whose code the innermost of ``frames`` (outer
    first; anything with ``filename``, ``lineno`` and ``line``) runs; ``[""]``: the model's own."""
    current: list[tuple[str, nn.Module]] = [("", model)]
    previous_line = ""
    for frame in frames:
        kind = _owner(frame.filename, frame.lineno or 0, classes)
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


def in_model(filename: str, line: int | None, classes: Spans) -> bool:
    """Whether ``filename:line`` is code of one of the model's module classes."""
    path = os.path.realpath(filename)
    return any(file == path and first <= (line or 0) <= last for file, first, last in classes.values())


def place_code(model: nn.Module, filename: str, line: int, classes: Spans) -> list[str]:
    """Every module of the model whose class's source holds ``filename:line``, by qualified
    name; ``[""]`` for the model itself or a line in no module class."""
    kind = _owner(filename, line, classes)
    if kind is None or kind is type(model):
        return [""]
    return [name for name, _ in _below("", model, kind)] or [""]


def frames_in_text(text: str) -> list[traceback.FrameSummary]:
    """The frames a message prints as a stack (``File "m.py", line 8, in forward``), outer
    first, each with its source line read from the file."""
    return [
        traceback.FrameSummary(
            match["file"],
            int(match["line"]),
            match["name"],
            line=(linecache.getline(match["file"], int(match["line"])).strip()),
        )
        for match in _FRAME_LINE.finditer(text)
    ]


def layer_label(names: Sequence[str]) -> str:
    """Several places as one finding's layer: the first three, then how many more."""
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def readable_reason(text: str) -> tuple[str, str]:
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


def where(filename: str, line: int | None) -> str:
    """``path:line``, the path relative to the working directory when it is below it."""
    path = os.path.realpath(filename)
    here = os.path.realpath(os.getcwd())
    shown = os.path.relpath(path, here) if path.startswith(here + os.sep) else path
    return f"{shown}:{line}"


@contextmanager
def model_kept(model: nn.Module) -> Iterator[None]:
    """The forward runs for real: buffers (BatchNorm's running statistics) and Python-side
    state go back after it, and attributes a compile or an export sets on a module
    (``_is_torch_compile``) are removed."""
    modules = list(model.modules())
    names = [set(vars(module)) for module in modules]
    with buffers_kept(model), python_state_kept(modules):
        try:
            yield
        finally:
            for module, before in zip(modules, names, strict=True):
                for added in set(vars(module)) - before:
                    delattr(module, added)
