"""The public API: every name the package exports resolves, lazily, to the object its module
defines; ``__all__`` is the export table; the names DESIGN promises are there with their
signatures."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest

import pytest_modelhooks


def test_every_public_name_resolves_from_the_package_and_its_module() -> None:
    lazy = pytest_modelhooks._EXPORTS
    assert set(pytest_modelhooks.__all__) == set(lazy) | {"__version__"}
    for name, module in lazy.items():
        value = getattr(pytest_modelhooks, name)
        assert value is getattr(importlib.import_module(f"pytest_modelhooks.{module}"), name), name
        assert name in importlib.import_module(f"pytest_modelhooks.{module}").__all__, name
    assert set(lazy) <= set(dir(pytest_modelhooks))


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'model_sizez'"):
        pytest_modelhooks.model_sizez  # noqa: B018


@pytest.mark.parametrize(
    ("name", "parameters"),
    [
        ("Hook", ["module", "hook_func", "is_forward", "detach", "cpu"]),
        ("Hooks", ["modules", "hook_func", "is_forward", "detach", "cpu"]),
        ("hook_output", ["module", "detach", "grad", "cpu"]),
        ("hook_outputs", ["modules", "detach", "grad", "cpu"]),
        ("dummy_batch", ["model", "size"]),
        ("dummy_eval", ["model", "size"]),
        ("model_sizes", ["model", "size"]),
        ("model_summary", ["model", "input_size", "input_data"]),
        ("model_memory", ["model", "input"]),
        ("max_batch_size", ["model", "make_input", "budget"]),
    ],
)
def test_the_promised_signatures_start_as_promised(name: str, parameters: list[str]) -> None:
    signature = inspect.signature(getattr(pytest_modelhooks, name))
    assert list(signature.parameters)[: len(parameters)] == parameters


@pytest.mark.parametrize("name", ["StoredOutputChanged", "LayerError"])
def test_the_errors_import_without_torch(name: str) -> None:
    code = f"import sys, pytest_modelhooks; pytest_modelhooks.{name}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_the_snapshot_extension_keeps_its_dotted_path() -> None:
    # pytest-xdist and syrupy's --snapshot-default-extension name it so
    from pytest_modelhooks.snapshot import ModelSnapshotExtension

    assert ModelSnapshotExtension.__module__ == "pytest_modelhooks.snapshot"
