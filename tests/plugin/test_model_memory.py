"""The model_memory fixture: the configured budget (ini, marker, call), the report in the test's
report on failure, sizes for the configured device."""

from __future__ import annotations

from tests.plugin._helpers import write


def test_the_budget_comes_from_the_ini_the_marker_and_the_call(run, pytester) -> None:
    pytester.makeini("[pytest]\naddopts = -p no:randomly -p no:cacheprovider\nmodelhooks_max_memory = 1GiB\n")
    write(
        pytester,
        "test_fit",
        """
        import pytest, torch
        from models import mlp

        def test_fits_the_ini_budget(model_memory):
            report = model_memory(mlp(), torch.randn(32, 8))
            assert report.peak_bytes > 0
            report.check()

        @pytest.mark.modelhooks(max_memory="1KiB")
        def test_over_the_marker_budget(model_memory):
            model_memory(mlp(), torch.randn(32, 8)).check()

        def test_the_call_wins(model_memory):
            model_memory(mlp(), torch.randn(32, 8)).check(max_peak=100)
        """,
    )
    result = run()
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        ["*memory check failed: Sequential training step, adamw*over the budget of 1.0 KiB*"]
    )
    result.stdout.fnmatch_lines(["*over the budget of 100 B*"])
    # the whole report goes into the failing test's report
    result.stdout.fnmatch_lines(["*Captured modelhooks call*", "*saved for backward*"])


def test_no_budget_anywhere_fails_saying_where_to_give_one(pytester, inprocess) -> None:
    write(
        pytester,
        "test_nobudget",
        """
        import torch
        from torch import nn

        def test_it(model_memory):
            model_memory(nn.Linear(4, 2), torch.randn(3, 4)).check()
        """,
    )
    result = inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*report.check() has no budget: pass max_peak=*modelhooks_max_memory*"])


def test_a_bad_budget_is_a_usage_error(pytester, inprocess) -> None:
    pytester.makeini("[pytest]\nmodelhooks_max_memory = lots\n")
    pytester.makepyfile(test_x="def test_x(): pass\n")
    result = inprocess("-p", "no:cacheprovider")
    result.stderr.fnmatch_lines(["*modelhooks_max_memory='lots': expected a size such as 24GiB*"])
    assert result.ret != 0


def test_the_cuda_device_sizes_blocks_without_a_gpu(pytester, inprocess) -> None:
    write(
        pytester,
        "test_cuda_sizes",
        """
        import torch
        from torch import nn

        def test_it(model_memory):
            assert model_memory(nn.Linear(4, 2), torch.randn(3, 4)).rounding == 512
        """,
    )
    result = inprocess("-p", "no:cacheprovider", "--modelhooks-device", "cuda")
    result.assert_outcomes(passed=1)
