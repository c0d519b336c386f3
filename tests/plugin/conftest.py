"""Shared helpers for the plugin's end-to-end tests (pytester)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

# pytester restores sys.modules after each test that uses it: a torch first imported inside
# such a test (to ask torch.cuda.is_available()) would be dropped, and the next test importing
# it again crashes in torch's C extension. Imported here, before any test, it stays.
import torch  # noqa: F401

from tests.plugin._helpers import MODELS


@pytest.fixture(params=[[], ["-n", "2"]], ids=["serial", "xdist"])
def run(request: pytest.FixtureRequest, pytester: pytest.Pytester) -> Callable[..., pytest.RunResult]:
    """Run pytest in a subprocess on the pytester directory, once without xdist, once with -n 2."""
    pytester.makepyfile(models=MODELS)
    pytester.makeini("[pytest]\naddopts = -p no:randomly -p no:cacheprovider\n")

    def runner(*args: str) -> pytest.RunResult:
        return pytester.runpytest_subprocess(*request.param, *args)

    return runner
