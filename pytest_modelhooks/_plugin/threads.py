"""torch's CPU threads per test process: ``--modelhooks-threads`` / ``modelhooks_threads``.

pytest-xdist starts a worker per core, and torch gives each worker a thread per core: on N
cores, N*N threads preempt each other mid-kernel, and a suite of small models (hundreds of
tiny kernels per check) runs several times slower than with one thread each. ``auto`` (the
default) gives each xdist worker its share of the cores, ``cores // workers``; outside xdist,
or where the user set ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``, it changes nothing. An
integer sets that many threads in every process that runs tests; ``off`` leaves torch alone.

``auto`` imports nothing: where torch is not imported yet, it sets ``OMP_NUM_THREADS``, which
torch reads when it starts its thread pool (and the BLAS libraries do too); where it is, it
calls ``torch.set_num_threads``. A number is set with ``torch.set_num_threads`` (torch caps
``OMP_NUM_THREADS`` at the cores).

>>> threads_for("auto", cores=16, workers=4, environ={})
4
>>> threads_for("auto", cores=16, workers=None, environ={}) is None  # not under xdist
True
>>> threads_for("auto", cores=16, workers=4, environ={"OMP_NUM_THREADS": "8"}) is None
True
>>> threads_for("2", cores=16, workers=None, environ={})
2
>>> threads_for("off", cores=16, workers=4, environ={}) is None
True
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import pytest

#: what the user sets to choose threads themselves: ``auto`` then leaves them be
_USER_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def parse_threads(text: str, where: str) -> str:
    """``auto``, ``off`` or a positive integer, as given (a usage error naming ``where``)."""
    value = str(text).strip().lower()
    if value in ("auto", "off") or (value.isdigit() and int(value) > 0):
        return value
    raise pytest.UsageError(f"{where}: expected auto, off or a positive number of threads, got {text!r}")


def threads_for(setting: str, *, cores: int, workers: int | None, environ: Mapping[str, str]) -> int | None:
    """The number of torch threads for this process, or None to leave torch's own."""
    if setting == "off":
        return None
    if setting != "auto":
        return int(setting)
    if workers is None or any(environ.get(name) for name in _USER_THREAD_VARIABLES):
        return None
    return max(1, cores // workers)


def _xdist_workers(environ: Mapping[str, str]) -> int | None:
    """The number of xdist workers, where this process is one of them."""
    count = environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not environ.get("PYTEST_XDIST_WORKER") or not count or not count.isdigit() or int(count) < 1:
        return None
    return int(count)


def apply_threads(setting: str) -> int | None:
    """Set this process's torch threads as ``setting`` says; the number set, or None."""
    threads = threads_for(
        setting, cores=os.cpu_count() or 1, workers=_xdist_workers(os.environ), environ=os.environ
    )
    if threads is None:
        return None
    torch = sys.modules.get("torch")
    if torch is None and setting != "auto":
        # a number asked for: torch reads OMP_NUM_THREADS capped at the cores, so it is set
        # through torch itself, which then loads now
        import torch
    if torch is not None and hasattr(torch, "set_num_threads"):
        torch.set_num_threads(threads)
    else:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads
