"""The model_compiles fixture: the allowance of graph breaks (ini, marker, call), the breaks in
the test's report, and snapshots of the breaks with a row per new one."""

from __future__ import annotations

from tests.plugin._helpers import write

BREAKING = """
import pytest, torch
from torch import nn

class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        y = self.proj(x)
        if y.mean() > 0:
            y = y * 2
        {extra}
        return y

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()

    def forward(self, x):
        return self.gate(x)
"""


def test_the_allowance_comes_from_the_ini_the_marker_and_the_call(run, pytester) -> None:
    pytester.makeini(
        "[pytest]\naddopts = -p no:randomly -p no:cacheprovider\nmodelhooks_max_graph_breaks = 5\n"
    )
    write(pytester, "breaking", BREAKING.format(extra=""))
    write(
        pytester,
        "test_compiles",
        """
        import pytest, torch
        from torch import nn
        from breaking import Net

        def test_within_the_ini_allowance(model_compiles):
            (found,) = model_compiles(Net(), torch.randn(2, 4))
            assert found.layer == "gate"

        @pytest.mark.modelhooks(max_graph_breaks=0)
        def test_over_the_marker_allowance(model_compiles):
            model_compiles(Net(), torch.randn(2, 4))

        def test_the_call_wins(model_compiles):
            model_compiles(Net(), torch.randn(2, 4), max_graph_breaks=0)

        def test_a_clean_model_passes(model_compiles):
            assert model_compiles(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.randn(2, 4)) == []
        """,
    )
    result = run("-rA")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(["*compile check failed: * graph break(s), 0 allowed, in 1 place(s)*"])
    # allowed breaks are listed in the passing test's report, failing ones in the failing test's
    result.stdout.fnmatch_lines(
        [
            "*test_within_the_ini_allowance*",
            "*Captured modelhooks call*",
            "*torch.compile: 1 place(s), within max_graph_breaks=5*",
            "*gate*Gate*graph break*breaking.py:11 `if y.mean() > 0:`*",
        ]
    )


def test_a_bad_allowance_is_a_usage_error(pytester, inprocess) -> None:
    pytester.makeini("[pytest]\nmodelhooks_max_graph_breaks = some\n")
    pytester.makepyfile(test_x="def test_x(): pass\n")
    result = inprocess("-p", "no:cacheprovider")
    result.stderr.fnmatch_lines(
        ["*modelhooks_max_graph_breaks: expected a non-negative integer, got 'some'*"]
    )
    assert result.ret != 0


def test_a_snapshot_of_the_breaks_shows_a_new_break_as_an_added_row(pytester, inprocess) -> None:
    pytester.makeini(
        "[pytest]\naddopts = -p no:randomly -p no:cacheprovider\nmodelhooks_max_graph_breaks = 10\n"
    )
    test = """
        import torch
        from breaking import Net

        def test_breaks(model_compiles, model_snapshot):
            assert model_compiles(Net(), torch.randn(2, 4)) == model_snapshot
        """
    write(pytester, "breaking", BREAKING.format(extra=""))
    write(pytester, "test_snap", test)
    assert inprocess("--snapshot-update").ret == 0
    stored = (pytester.path / "__snapshots__" / "test_snap" / "test_breaks.txt").read_text()
    assert "gate (Gate) `if y.mean() > 0:`" in stored
    assert "breaking.py:" not in stored  # no line numbers: code moving down is no change
    write(pytester, "breaking", "# a comment moves every line down\n" + BREAKING.format(extra=""))
    inprocess().assert_outcomes(passed=1)
    write(pytester, "breaking", BREAKING.format(extra='print("y", y.shape)'))
    changed = inprocess()
    changed.assert_outcomes(failed=1)
    changed.stdout.fnmatch_lines(
        ["*Changed layers (snapshot -> now): 1 added*", "*+ gate (Gate) `print(*: added*"]
    )
