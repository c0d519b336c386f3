"""The activation_stats fixture: configured bounds, report sections, plots."""

from __future__ import annotations

from tests.plugin._helpers import write


def test_activation_stats_uses_marker_bounds_and_reports_the_table(run, pytester, tmp_path) -> None:
    write(
        pytester,
        "test_health",
        """
        import pytest, torch
        from models import mlp

        @pytest.mark.modelhooks(std=(5.0, 10.0))
        def test_too_narrow(activation_stats):
            model = mlp()
            with activation_stats(model) as stats:
                model(torch.randn(32, 8))
            stats.check()

        def test_healthy(activation_stats):
            model = mlp()
            with activation_stats(model) as stats:
                model(torch.randn(32, 8))
            stats.check(std=(0.01, 10.0))
        """,
    )
    plots = tmp_path / "plots"
    result = run(f"--modelhooks-plots={plots}")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*HealthError: activation health check failed: 2 finding(s) in 2 layer(s)*",
            "*Captured modelhooks call*",
            # the section holds what the error leaves out: every layer, those that failed marked
            "activation health check failed: 2 finding(s) in 2 layer(s)",
            "Statistics of every recorded layer over 1 batch (> marks a finding)",
            "*layer*type*mean*std*near_zero*dead*min*max*nonfinite",
            ">  0 *Linear*",
            ">  2 *Linear*",
            "plot: *test_too_narrow-activations.png",
        ]
    )
    # and not the findings table again (the short summary may repeat the error: under CI=true
    # pytest prints it whole)
    section = result.stdout.str().split("Captured modelhooks call")[1].split("short test summary info")[0]
    assert "statistic  observed" not in section
    assert len(list(plots.glob("*test_too_narrow-activations.png"))) == 1


def test_fused_statistics_through_the_fixture_serially_and_under_xdist(run, pytester) -> None:
    # the fixture passes fused=True on; each xdist worker compiles its own kernel (or, where
    # torch cannot compile, warns and records with the separate passes): same numbers either way
    write(
        pytester,
        "test_fused",
        """
        import torch
        from models import mlp
        from pytest_modelhooks import ActivationStats

        def test_fused_matches(activation_stats):
            model = mlp()
            batch = torch.randn(32, 8)
            with activation_stats(model, fused=True) as fused, ActivationStats(model) as separate:
                model(batch)
            for name in separate.series_names:
                torch.testing.assert_close(fused[name].std, separate[name].std, rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(fused[name].near_zero, separate[name].near_zero)
            fused.check(std=(0.01, 10.0))
        """,
    )
    run("-W", "ignore::UserWarning").assert_outcomes(passed=1)


def test_a_test_that_never_runs_the_model_fails_with_the_reason(run, pytester) -> None:
    # the trap a vacuous check would set: the forward happens outside the block
    write(
        pytester,
        "test_forgot",
        """
        import torch
        from models import mlp

        def test_forgot_to_run(activation_stats):
            model = mlp()
            with activation_stats(model) as stats:
                pass
            model(torch.randn(4, 8))
            stats.check()

        def test_forgot_backward(gradient_stats):
            model = mlp()
            with gradient_stats(model) as grads:
                model(torch.randn(4, 8))
            grads.check()
        """,
    )
    result = run()
    result.assert_outcomes(failed=2)
    # each on its own: under xdist the two failures come back in either order
    result.stdout.fnmatch_lines(["*no batch was recorded: Sequential's forward did not run while the hooks*"])
    result.stdout.fnmatch_lines(["*no backward pass was recorded (4 parameter(s) require grad)*"])
