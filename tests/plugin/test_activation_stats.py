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
            "layer*type*statistic*observed*bound*batch*note*",
            "0 *Linear*std*>= 5*0*vanishing*",
            "2 *Linear*std*>= 5*0*vanishing*",
            "plot: *test_too_narrow-activations.png",
        ]
    )
    assert len(list(plots.glob("*test_too_narrow-activations.png"))) == 1
