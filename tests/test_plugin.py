"""The plugin end to end, through pytester: each behaviour without xdist and with ``-n 2``."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest_plugins = ["pytester"]

MODELS = """
import torch
from torch import nn

def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
"""


@pytest.fixture(params=[[], ["-n", "2"]], ids=["serial", "xdist"])
def run(request: pytest.FixtureRequest, pytester: pytest.Pytester):
    pytester.makepyfile(models=MODELS)
    pytester.makeini("[pytest]\naddopts = -p no:randomly -p no:cacheprovider\n")

    def runner(*args: str) -> pytest.RunResult:
        return pytester.runpytest_subprocess(*request.param, *args)

    return runner


def write(pytester: pytest.Pytester, name: str, source: str) -> None:
    pytester.makepyfile(**{name: textwrap.dedent(source)})


def test_importing_the_plugin_does_not_import_torch() -> None:
    code = "import sys, pytest_modelhooks.plugin, pytest_modelhooks; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "False"


def test_help_shows_the_option_group_and_the_header_names_torch_and_device(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(
        ["*modelhooks*", "*--modelhooks-device*", "*--modelhooks-plots=DIR*", "*--modelhooks-check-leaks*"]
    )
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    header = pytester.runpytest_subprocess()
    header.stdout.fnmatch_lines(["modelhooks: torch *, device cpu"])


def test_a_run_that_uses_no_fixture_does_not_import_torch(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_plain="""
        import sys
        def test_plain():
            assert "torch" not in sys.modules
        """
    )
    pytester.runpytest_subprocess("-p", "no:randomly").assert_outcomes(passed=1)


def test_hooked_model_removes_hooks_at_teardown_even_when_the_test_fails(run, pytester) -> None:
    write(
        pytester,
        "test_hooked",
        """
        import pytest
        from models import mlp
        from pytest_modelhooks import count_hooks

        @pytest.fixture
        def model():
            net = mlp()
            yield net
            assert count_hooks(net) == 0, "hooks left behind"  # runs after hooked_model's teardown

        def test_stores_outputs(model, hooked_model):
            hooks = hooked_model(model)
            model(__import__("torch").zeros(2, 8))
            assert [tuple(out.shape) for out in hooks.stored] == [(2, 16), (2, 16), (2, 4)]
            assert count_hooks(model) == 3

        def test_fails_midway(model, hooked_model):
            hooked_model(model, modules="leaves", grad=True)
            raise RuntimeError("the test body failed")
        """,
    )
    result = run()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*RuntimeError: the test body failed*"])
    assert "hooks left behind" not in result.stdout.str()


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
        """,
    )
    result = run("--strict-markers")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        ["*@pytest.mark.modelhooks(max_dead=...): expected a number in [[]0, 1[]], got 3*"]
    )
    result.stdout.fnmatch_lines(
        ["*@pytest.mark.modelhooks got unknown argument(s) stdev; known: std, max_dead*"]
    )
    assert "_session.py" not in result.stdout.str()  # no traceback into the plugin


def test_the_marker_is_registered_for_strict_markers(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.modelhooks(std=(low, high), max_dead=*"])


def test_leak_guard_names_the_module_with_a_hook_added_during_the_test(run, pytester) -> None:
    write(
        pytester,
        "test_leaks",
        """
        from models import mlp

        def test_leaves_a_hook(model_sizes):
            model = mlp()
            model_sizes(model, input=__import__("torch").zeros(1, 8))
            model[2].register_forward_hook(lambda *args: None)  # never removed

        def test_clean(model_summary):
            model_summary(mlp(), input_size=(1, 8))
        """,
    )
    guarded = run("--modelhooks-check-leaks")
    guarded.assert_outcomes(passed=2, errors=1)
    guarded.stdout.fnmatch_lines(
        [
            "*modelhooks: hooks added during the test are still registered:*",
            "*Sequential '2' (Linear): 1 forward hook*",
        ]
    )
    run().assert_outcomes(passed=2)


def test_gradient_stats_names_unused_parameters(run, pytester) -> None:
    write(
        pytester,
        "test_grads",
        """
        import torch
        from torch import nn

        def test_unused(gradient_stats):
            model = nn.ModuleDict({"used": nn.Linear(3, 1), "unused": nn.Linear(3, 1)})
            with gradient_stats(model) as grads:
                model["used"](torch.randn(2, 3)).sum().backward()
            grads.check()
        """,
    )
    result = run()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*gradient health check failed*", "*unused.weight*unused: its .grad stayed None*"]
    )


def test_fixtures_work_inside_given_tests(run, pytester) -> None:
    write(
        pytester,
        "test_given",
        """
        from hypothesis import HealthCheck, given, settings
        from pytest_modelhooks.strategies import image_batches, input_sizes
        import torch
        from torch import nn

        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())

        @settings(max_examples=5, deadline=None)
        @given(size=input_sizes(min_side=4, max_side=16))
        def test_sizes(model_sizes, model_summary, size):
            assert model_sizes(net, size[2:])[0] == (1, 4, *size[2:])
            assert model_summary(net, input_size=size).total_params == 112

        # function-scoped fixtures: suppress the health check; each example uses a fresh,
        # self-cleaning context manager
        @settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(batch=image_batches(min_side=4, max_side=8))
        def test_stats(activation_stats, batch):
            with activation_stats(net) as stats:
                net(batch)
            stats.check(std=(0.0, 10.0))
        """,
    )
    run().assert_outcomes(passed=2)


def test_cuda_device_is_skipped_without_cuda(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(models=MODELS)
    write(
        pytester,
        "test_device",
        """
        import pytest
        from models import mlp

        @pytest.mark.modelhooks(device="cuda")
        def test_on_cuda(hooked_model):
            hooked_model(mlp())
        """,
    )
    import torch

    result = pytester.runpytest_subprocess("-p", "no:randomly")
    if torch.cuda.is_available():
        result.assert_outcomes(passed=1)
    else:
        result.assert_outcomes(skipped=1)


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
            "*~ 0 (Conv2d): output (1, 16, 16, 16) -> (1, 32, 16, 16); params +448*",
            "*~ 2 (Conv2d): input (1, 16, 16, 16) -> (1, 32, 16, 16); output (1, 8, 14, 14) -> (1, 8, 7, 7); "
            "params +1.15 K*",
            "*total params: 1,608 -> 3,208 (+1.60 K)*",
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
