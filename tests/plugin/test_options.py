"""Options, ini keys and the marker: precedence and validation."""

from __future__ import annotations

import pytest

from tests.plugin._helpers import write


def test_precedence_marker_over_cli_over_ini(run, pytester) -> None:
    pytester.makeini(
        "[pytest]\naddopts = -p no:randomly -p no:cacheprovider\n"
        "modelhooks_std_range = 5,10\nmodelhooks_max_dead = 0.9\nmodelhooks_device = cuda\n"
    )
    write(
        pytester,
        "test_precedence",
        """
        import pytest, torch
        from models import mlp

        def record(activation_stats):
            model = mlp()
            with activation_stats(model) as stats:
                model(torch.randn(32, 8))
            return stats

        def test_ini_bounds_apply(activation_stats):
            with pytest.raises(AssertionError, match="vanishing"):
                record(activation_stats).check()

        @pytest.mark.modelhooks(std=(0.01, 10.0))
        def test_marker_wins(activation_stats):
            record(activation_stats).check()

        def test_cli_device_wins_over_ini(model_sizes):
            model = mlp()
            model_sizes(model, input=torch.zeros(1, 8))
            assert next(model.parameters()).device.type == "cpu"
        """,
    )
    run("--modelhooks-device=cpu").assert_outcomes(passed=3)


@pytest.mark.parametrize(
    ("ini", "message"),
    [
        ("modelhooks_max_dead = 2", "modelhooks_max_dead: expected a number in [[]0, 1[]], got '2'"),
        ("modelhooks_std_range = 3", "modelhooks_std_range: expected two numbers 'low,high', got '3'"),
        ("modelhooks_std_range = 5,1", "modelhooks_std_range: need 0 <= low <= high, got '5,1'"),
        ("modelhooks_device = tpu", "modelhooks_device: expected one of cpu, cuda, auto, got 'tpu'"),
        ("modelhooks_snapshot_rtol = -1", "modelhooks_snapshot_rtol: expected a positive number, got '-1'"),
        ("modelhooks_max_grad_norm = big", "modelhooks_max_grad_norm: expected a positive number, got 'big'"),
        (
            "modelhooks_max_grad_norm = 1\nmodelhooks_min_grad_norm = 5",
            "modelhooks_min_grad_norm: min_grad_norm=5.0 is above max_grad_norm=1.0",
        ),
    ],
)
def test_bad_ini_values_are_usage_errors(pytester: pytest.Pytester, ini: str, message: str) -> None:
    pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])


def test_bad_marker_arguments_error_the_test(run, pytester) -> None:
    write(
        pytester,
        "test_marker",
        """
        import pytest

        @pytest.mark.modelhooks(max_dead=3)
        def test_bad_value(activation_stats):
            pass

        @pytest.mark.modelhooks(stdev=(1, 2))
        def test_unknown_key(activation_stats):
            pass

        @pytest.mark.modelhooks(max_grad_norm=1, min_grad_norm=2)
        def test_crossed_norms(gradient_stats):
            pass
        """,
    )
    result = run("--strict-markers")
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines(["*@pytest.mark.modelhooks: min_grad_norm=2.0 is above max_grad_norm=1.0*"])
    result.stdout.fnmatch_lines(
        ["*@pytest.mark.modelhooks(max_dead=...): expected a number in [[]0, 1[]], got 3*"]
    )
    result.stdout.fnmatch_lines(
        ["*@pytest.mark.modelhooks got unknown argument(s) stdev; known: std, max_dead*"]
    )
    assert "_session.py" not in result.stdout.str()  # no traceback into the plugin
    assert "During handling of the above exception" not in result.stdout.str()  # said once
    # The error section says it once (the short summary repeats it when the terminal is wide).
    errors = result.stdout.str().split("short test summary info")[0]
    assert errors.count("got unknown argument(s) stdev; known") == 1


def test_the_device_fixture_follows_marker_cli_and_ini(run, pytester) -> None:
    pytester.makeini("[pytest]\naddopts = -p no:randomly -p no:cacheprovider\nmodelhooks_device = cpu\n")
    write(
        pytester,
        "test_device",
        """
        import pytest, torch
        from models import mlp

        def test_configured(modelhooks_device, activation_stats):
            assert isinstance(modelhooks_device, torch.device)
            model = mlp()
            with activation_stats(model) as stats:  # the model moves to the same device
                model(torch.randn(4, 8, device=modelhooks_device))
            assert next(model.parameters()).device.type == modelhooks_device.type == "cuda"
            assert stats.num_batches == 1

        @pytest.mark.modelhooks(device="cpu")
        def test_marker_wins(modelhooks_device):
            assert modelhooks_device == torch.device("cpu")
        """,
    )
    result = run("--modelhooks-device=cuda", "-rs")
    if result.parseoutcomes().get("skipped"):  # no CUDA here: skipped, with the reason
        result.assert_outcomes(passed=1, skipped=1)
        result.stdout.fnmatch_lines(["*modelhooks device is cuda, but CUDA is not available*"])
    else:
        result.assert_outcomes(passed=2)
    default = run()
    default.assert_outcomes(passed=1, failed=1)  # on the CPU the first test's device check fails
    default.stdout.fnmatch_lines(["*assert 'cpu' == 'cuda'*"])
