"""A check called as a plain function puts its table into the failing test's report, as the
fixtures do, once."""

from __future__ import annotations

from tests.plugin._helpers import write


def test_a_plain_checks_table_goes_into_the_report_once(pytester, inprocess) -> None:
    write(
        pytester,
        "test_plain",
        """
        import torch
        from torch import nn
        from pytest_modelhooks import check_loads

        def test_old_checkpoint(model_snapshot):
            old = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
            new = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
            check_loads(new, old.state_dict())

        def test_passes():
            net = nn.Linear(2, 2)
            check_loads(net, net.state_dict())
        """,
    )
    result = inprocess("-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*Captured modelhooks call*",
            "checkpoint check failed (strict=True): 2 shape",
            "layer*",
            "1.weight*shape*",
        ]
    )
    assert result.stdout.str().count("Captured modelhooks call") == 1
