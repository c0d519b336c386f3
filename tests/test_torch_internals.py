"""The private torch (and syrupy) names the package relies on, all behind
``pytest_modelhooks._torch``: a torch upgrade that removes one fails here, naming it."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from pytest_modelhooks import _torch

PACKAGE = Path(__file__).resolve().parent.parent / "pytest_modelhooks"


def test_every_private_name_relied_on_is_in_this_torch() -> None:
    absent = _torch.missing()
    assert not absent, (
        f"torch {torch.__version__} lacks what pytest_modelhooks relies on: {', '.join(absent)}"
    )


def test_a_missing_name_is_reported_by_name(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(
        _torch, "REQUIRED", (*_torch.REQUIRED, ("torch._C._gone_in_this_torch", lambda: False))
    )
    assert _torch.missing() == ["torch._C._gone_in_this_torch"]


def test_no_other_module_reaches_into_torch_privates() -> None:
    # private modules of torch (torch._C, torch.utils._python_dispatch, torch._subclasses...)
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_torch.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.ImportFrom) and node.module:
                name = node.module
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "torch"
            ):
                name = f"torch.{node.attr}"
            if (
                name
                and name.startswith("torch")
                and any(part.startswith("_") and not part.startswith("__") for part in name.split("."))
            ):
                offences.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {name}")
    assert not offences, "\n".join(offences)
