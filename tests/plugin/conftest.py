"""Shared helpers for the plugin's end-to-end tests (pytester)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.plugin._helpers import MODELS


@pytest.fixture(params=[[], ["-n", "2"]], ids=["serial", "xdist"])
def run(request: pytest.FixtureRequest, pytester: pytest.Pytester) -> Callable[..., pytest.RunResult]:
    """Run pytest in a subprocess on the pytester directory, once without xdist, once with -n 2."""
    pytester.makepyfile(models=MODELS)
    pytester.makeini("[pytest]\naddopts = -p no:randomly -p no:cacheprovider\n")

    def runner(*args: str) -> pytest.RunResult:
        return pytester.runpytest_subprocess(*request.param, *args)

    return runner
