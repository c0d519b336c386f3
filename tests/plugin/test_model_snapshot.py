"""The model_snapshot fixture: the snapshot lifecycle and tolerances."""

from __future__ import annotations

import textwrap

from tests.plugin._helpers import write

SNAPSHOT_TEST = """
import torch
from torch import nn

WIDTH = {width}

def test_summary(model_summary, model_snapshot):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, WIDTH, 3, padding=1), nn.ReLU(), nn.Conv2d(WIDTH, 8, 3, stride={stride}))
    assert model_summary(net, input_size=(1, 3, 16, 16)) == model_snapshot

def test_sizes(model_sizes, model_snapshot):
    net = nn.Sequential(nn.Conv2d(3, WIDTH, 3, padding=1), nn.ReLU())
    assert model_sizes(net, (16, 16)) == model_snapshot
"""


def test_snapshot_lifecycle_create_pass_change_fail_update(run, pytester) -> None:
    write(pytester, "test_snap", SNAPSHOT_TEST.format(width=16, stride=1))
    missing = run()
    missing.assert_outcomes(failed=2)
    # a snapshot not written yet says how to write it, without listing every layer as changed
    missing.stdout.fnmatch_lines(
        ["*Snapshot 'test_summary' does not exist!*", "*Write it with: pytest --snapshot-update*"]
    )
    assert "Changed layers" not in missing.stdout.str()
    created = run("--snapshot-update")
    created.assert_outcomes(passed=2)
    stored = pytester.path / "__snapshots__" / "test_snap" / "test_summary.txt"
    assert "Total params: 1,608" in stored.read_text()
    run().assert_outcomes(passed=2)

    write(pytester, "test_snap", SNAPSHOT_TEST.format(width=32, stride=2))
    changed = run()
    changed.assert_outcomes(failed=2)
    changed.stdout.fnmatch_lines(
        [
            "*Changed layers (snapshot -> now):*",
            "*total params: 1,608 -> 3,208 (+1.60 K)*",  # the totals first
            "*~ 0 (Conv2d): output (1, 16, 16, 16) -> (1, 32, 16, 16); params +448*",
            "*~ 2 (Conv2d): input (1, 16, 16, 16) -> (1, 32, 16, 16); output (1, 8, 14, 14) -> (1, 8, 7, 7); "
            "params +1.15 K*",
        ]
    )
    changed.stdout.fnmatch_lines(["*~ 0 (Conv2d): output (1, 16, 16, 16) -> (1, 32, 16, 16)*"])
    run("--snapshot-update").assert_outcomes(passed=2)
    run().assert_outcomes(passed=2)


def test_snapshot_tolerance_for_statistics(run, pytester) -> None:
    write(
        pytester,
        "test_stats_snap",
        """
        import os, torch
        from torch import nn

        def test_stats(activation_stats, model_snapshot):
            torch.manual_seed(int(os.environ.get("SEED", "0")))
            model = nn.Sequential(nn.Linear(64, 64), nn.Tanh())
            torch.manual_seed(0)
            with activation_stats(model) as stats:
                model(torch.randn(512, 64))
            assert stats == model_snapshot
        """,
    )
    run("--snapshot-update").assert_outcomes(passed=1)
    pytester.makeini(
        "[pytest]\naddopts = -p no:randomly -p no:cacheprovider\n"
        "modelhooks_snapshot_rtol = 0.05\nmodelhooks_snapshot_atol = 0.02\n"
    )
    import os

    os.environ["SEED"] = "1"  # other weights: statistics move a little
    try:
        run().assert_outcomes(passed=1)
        pytester.makeini("[pytest]\naddopts = -p no:randomly -p no:cacheprovider\n")
        run().assert_outcomes(failed=1)
    finally:
        del os.environ["SEED"]


PARAMETRIZED = """
import pytest
from torch import nn

@pytest.mark.parametrize("kernel", {kernels}, ids={ids})
def test_conv(kernel, model_sizes, model_snapshot):
    net = nn.Conv2d(3, 4, kernel, padding=kernel // 2)
    assert model_sizes(net, (8, 8)) == model_snapshot
    assert model_sizes(net, (4, 4)) == model_snapshot
"""


def test_parametrized_ids_a_file_name_cannot_hold_keep_their_snapshots(pytester, inprocess) -> None:
    # syrupy drops '/' and ':' from the file name, then could not relate the file to its test
    # and warned on every update; the snapshots are this test's, and only stale ones go
    pytester.makeini("[pytest]\naddopts = -p no:randomly -p no:cacheprovider\n")
    pytester.makepyfile(test_ids=PARAMETRIZED.format(kernels=[1, 3], ids=["conv/1x1", "conv:3x3"]))
    created = inprocess("--snapshot-update")
    created.assert_outcomes(passed=2)
    assert "Can not relate" not in created.stdout.str()
    folder = pytester.path / "__snapshots__" / "test_ids"
    names = [
        "test_conv[conv1x1].1.txt",
        "test_conv[conv1x1].txt",
        "test_conv[conv3x3].1.txt",
        "test_conv[conv3x3].txt",
    ]
    assert sorted(path.name for path in folder.iterdir()) == names
    inprocess().assert_outcomes(passed=2)
    pytester.makepyfile(test_ids=PARAMETRIZED.format(kernels=[3], ids=["conv:3x3"]))
    updated = inprocess("--snapshot-update")
    updated.assert_outcomes(passed=1)
    assert "Can not relate" not in updated.stdout.str()
    assert sorted(path.name for path in folder.iterdir()) == names[2:]


def test_the_tolerances_travel_with_the_fixture_not_the_extension_class(pytester, inprocess) -> None:
    # a test that uses the extension directly after a tolerant model_snapshot compares exactly
    pytester.makeini("[pytest]\nmodelhooks_snapshot_rtol = 0.5\naddopts = -p no:cacheprovider\n")
    write(
        pytester,
        "test_tolerance",
        """
        from pytest_modelhooks.snapshot import ModelSnapshotExtension

        VALUE = {value!r}

        def test_a_tolerant(model_snapshot):
            assert VALUE == model_snapshot

        def test_b_exact(snapshot):
            assert VALUE == snapshot.use_extension(ModelSnapshotExtension)

        def test_c_class_untouched():
            assert ModelSnapshotExtension.rtol == 0.0 and ModelSnapshotExtension.atol == 0.0
        """.replace("{value!r}", "'std 1.0'"),
    )
    inprocess("--snapshot-update").assert_outcomes(passed=3)
    write(
        pytester,
        "test_tolerance",
        (pytester.path / "test_tolerance.py").read_text().replace("'std 1.0'", "'std 1.2'"),
    )
    result = inprocess()
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*FAILED test_tolerance.py::test_b_exact*"])


def test_a_long_layer_diff_reaches_the_user_whole_at_default_verbosity(
    pytester, inprocess, monkeypatch
) -> None:
    # pytest cuts an assertion's explanation after a few lines unless -vv: the report section is
    # never cut, and the traceback names the snapshot instead of printing its whole text
    pytester.makeini("[pytest]\naddopts = -p no:cacheprovider\n")
    source = """
        from torch import nn

        def test_deep(model_summary, model_snapshot):
            net = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(12)], nn.Linear(WIDTH, 3))
            assert model_summary(net, input_size=(1, WIDTH)) == model_snapshot
        """
    write(pytester, "test_deep", "WIDTH = 8\n" + textwrap.dedent(source))
    inprocess("--snapshot-update").assert_outcomes(passed=1)
    write(pytester, "test_deep", "WIDTH = 16\n" + textwrap.dedent(source))
    for variable in ("CI", "BUILD_NUMBER"):  # pytest does not cut explanations on a CI machine
        monkeypatch.delenv(variable, raising=False)
    result = inprocess()
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "Full output truncated" in out  # pytest did cut the explanation...
    section = out.split("Captured modelhooks call")[1]
    # ...but the section holds every changed layer, the last one too, and the totals first
    assert section.index("total params:") < section.index("~ 0 (Linear)") < section.index("~ 12 (Linear)")
    assert "model_snapshot = <model_snapshot 'test_deep'>" in out
    assert "Total params: 651" not in out.split("Captured modelhooks call")[0]  # no stored text dumped
