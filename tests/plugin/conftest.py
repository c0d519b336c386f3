"""Shared helpers for the plugin's end-to-end tests (pytester)."""

from __future__ import annotations

import sys
from collections.abc import Callable

import _pytest.pytester
import pytest

# Imported here, before any test, so that no pytester snapshot is ever taken without it.
import torch  # noqa: F401

from tests.plugin._helpers import MODELS

# What an outer pytest-xdist worker puts in the environment: a run inside its process is not
# one of its workers.
_OUTER_XDIST = ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID")


@pytest.fixture(autouse=True)
def _keep_loaded_modules(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """pytester restores ``sys.modules`` after each in-process run and each test, dropping every
    module imported since: the test files it wrote, but also the parts of torch (dynamo, the
    inductor's test operators, fake tensors) a run loaded lazily, and torch's C extension
    cannot take a second import of those. Only the modules of pytester's own directories go."""
    root = str(tmp_path_factory.getbasetemp())
    original = _pytest.pytester.SysModulesSnapshot

    def outside(name: str) -> bool:
        return not (getattr(sys.modules.get(name), "__file__", None) or "").startswith(root)

    class KeepLoaded(original):  # type: ignore[misc, valid-type]
        def __init__(self, preserve: Callable[[str], bool] | None = None) -> None:
            super().__init__(preserve=outside)

    # (autouse: in place before pytester takes its first snapshot)
    monkeypatch.setattr(_pytest.pytester, "SysModulesSnapshot", KeepLoaded)


@pytest.fixture
def inprocess(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Callable[..., pytest.RunResult]:
    """``pytester.runpytest_inprocess`` as a fresh pytest run in its own directory would see it:
    in this process (no interpreter or torch start-up, seconds each), without the outer xdist
    worker's environment."""
    for variable in _OUTER_XDIST:
        monkeypatch.delenv(variable, raising=False)
    return pytester.runpytest_inprocess


@pytest.fixture(params=[False, True], ids=["serial", "xdist"])
def run(
    request: pytest.FixtureRequest, pytester: pytest.Pytester, inprocess: Callable[..., pytest.RunResult]
) -> Callable[..., pytest.RunResult]:
    """Run pytest on the pytester directory (in this process, see ``inprocess``), once without
    xdist, once under it: with one worker (tests run in a worker process of their own and their
    reports cross back, which is what xdist changes for a plugin; a second worker made each run
    cost 60% more CPU), or ``workers=2`` where the test is about several workers."""
    pytester.makepyfile(models=MODELS)
    pytester.makeini("[pytest]\naddopts = -p no:randomly -p no:cacheprovider\n")

    def runner(*args: str, workers: int = 1) -> pytest.RunResult:
        if request.param:
            return inprocess("-n", str(workers), *args)
        return inprocess(*args)

    return runner
