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
    result.stdout.fnmatch_lines(
        ["*no backward pass reached the model (4 parameter(s) require grad), though it ran with*"]
    )


def test_exclude_from_the_ini_file_the_marker_and_the_call(run, pytester) -> None:
    pytester.makeini(
        "[pytest]\naddopts = -p no:cacheprovider\nmodelhooks_std_range = 0.01,10\nmodelhooks_exclude = gate\n"
    )
    write(
        pytester,
        "test_exempt",
        """
        import pytest, torch
        from torch import nn

        class Gated(nn.Module):
            def __init__(self):
                super().__init__()
                self.body, self.gate, self.other = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
                for layer in (self.gate, self.other):  # small by design, not zero
                    nn.init.normal_(layer.weight, std=1e-4)
                    nn.init.zeros_(layer.bias)
            def forward(self, x):
                return self.body(x) + self.gate(x) + self.other(x)

        def run(activation_stats):
            model = Gated()
            with activation_stats(model) as stats:
                model(torch.randn(8, 4))
            return stats

        def test_the_ini_exempts_gate_only(activation_stats):
            found = run(activation_stats).findings(std=(0.01, 10.0), exclude=["gate"])
            assert [f.layer for f in found] == ["other"]
            with pytest.raises(AssertionError, match="other"):
                run(activation_stats).check()  # the ini's exclude: gate

        @pytest.mark.modelhooks(exclude=["gate", "other"])
        def test_the_marker_exempts_both(activation_stats):
            run(activation_stats).check()

        def test_a_call_overrides_the_ini(activation_stats):
            with pytest.raises(AssertionError, match="gate"):
                run(activation_stats).check(exclude=None)
        """,
    )
    run().assert_outcomes(passed=3)


def test_a_bad_exclude_in_the_ini_file_is_named(pytester, inprocess) -> None:
    pytester.makeini("[pytest]\nmodelhooks_exclude = ,\n")
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = inprocess()
    result.stderr.fnmatch_lines(["*modelhooks_exclude: expected module names or globs, got ','*"])
