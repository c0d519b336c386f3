"""The test report's ``modelhooks`` section: what fixtures, snapshot diffs and failed checks put
there. No torch import."""

from __future__ import annotations

import pytest

__all__ = ["REPORTED", "report_failed_check", "report_section"]

#: set on a test once a modelhooks section is in its report (a fixture's, a snapshot diff)
REPORTED = pytest.StashKey[bool]()


def report_section(item: pytest.Item, text: str) -> None:
    """Put ``text`` into the test's report, section ``modelhooks``, where pytest shows it whole."""
    item.add_report_section("call", "modelhooks", text)
    item.stash[REPORTED] = True


def report_failed_check(item: pytest.Item, error: BaseException) -> None:
    """A check called as a plain function (``check_loads``, ``check_overfits``...) that failed:
    its table goes into the report like a fixture's, unless a fixture already put one there."""
    from pytest_modelhooks.findings import HealthError

    if isinstance(error, HealthError) and not item.stash.get(REPORTED, False):
        report_section(item, str(error))
