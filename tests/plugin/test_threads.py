"""--modelhooks-threads: torch's CPU threads per test process, each pytest-xdist worker its share
of the cores by default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.plugin._helpers import write

REPORTS = """
import os, torch

def test_report_threads():
    name = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.path.join(os.environ["THREADS_OUT"], name), "w") as out:
        out.write(str(torch.get_num_threads()))
"""


@pytest.fixture
def threads(pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Run the reporting test in a subprocess; the threads each process had, by process."""
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)  # (this suite's own worker's, inherited)
    out = tmp_path / "threads"
    out.mkdir()
    monkeypatch.setenv("THREADS_OUT", str(out))
    pytester.makeini("[pytest]\naddopts = -p no:randomly -p no:cacheprovider\n")
    write(pytester, "test_reports", REPORTS + "\ndef test_second():\n    test_report_threads()\n")

    def run(*args: str) -> dict[str, int]:
        pytester.runpytest_subprocess(*args).assert_outcomes(passed=2)
        return {path.name: int(path.read_text()) for path in out.iterdir()}

    return run


def test_each_xdist_worker_gets_its_share_of_the_cores(threads) -> None:  # type: ignore[no-untyped-def]
    found = threads("-n", "2")
    assert set(found) <= {"gw0", "gw1"} and found
    assert set(found.values()) == {max(1, (os.cpu_count() or 1) // 2)}


def test_a_thread_count_set_by_the_user_is_left_alone(threads, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    plain = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert set(threads("-n", "2").values()) == {int(plain.stdout)}


def test_a_number_sets_the_threads_of_a_serial_run(threads) -> None:  # type: ignore[no-untyped-def]
    assert threads("--modelhooks-threads", "3") == {"main": 3}


def test_a_bad_thread_setting_is_a_usage_error_naming_it(pytester: pytest.Pytester, inprocess) -> None:  # type: ignore[no-untyped-def]
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    result = inprocess("-p", "no:cacheprovider", "--modelhooks-threads", "many")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--modelhooks-threads: expected auto, off or a positive number of threads, got 'many'*"]
    )
    pytester.makeini("[pytest]\nmodelhooks_threads = 0\n")
    result = inprocess("-p", "no:cacheprovider")
    result.stderr.fnmatch_lines(["*modelhooks_threads: expected auto, off or a positive number*, got '0'*"])
