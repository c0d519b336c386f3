"""Shared helpers for the plugin's end-to-end tests (pytester)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

# pytester restores sys.modules after each test that uses it: a torch first imported inside
# such a test (to ask torch.cuda.is_available()) would be dropped, and the next test importing
# it again crashes in torch's C extension. Imported here, before any test, it stays.
import torch  # noqa: F401

from tests.plugin._helpers import MODELS


@pytest.fixture(params=[False, True], ids=["serial", "xdist"])
def run(request: pytest.FixtureRequest, pytester: pytest.Pytester) -> Callable[..., pytest.RunResult]:
    """Run pytest in a subprocess on the pytester directory, once without xdist, once under it:
    with one worker (tests run in a worker process and their reports cross back, which is what
    xdist changes for a plugin; a second worker made each run cost 60% more CPU), or
    ``workers=2`` where the test is about several workers."""
    pytester.makepyfile(models=MODELS)
    pytester.makeini("[pytest]\naddopts = -p no:randomly -p no:cacheprovider\n")

    def runner(*args: str, workers: int = 1) -> pytest.RunResult:
        xdist = ["-n", str(workers)] if request.param else []
        return pytester.runpytest_subprocess(*xdist, *args)

    return runner
