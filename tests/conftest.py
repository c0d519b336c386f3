"""The project's own test runs: one pytest-xdist worker per core shares the cores with torch's
thread pool. Left at torch's default (a thread per core in every worker), the workers' threads
preempt each other mid-kernel: the training checks' hundreds of small steps ran 5-100x slower
under `-n auto` on 2 cores. Each worker gets its share of the cores instead."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers and os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))
