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
        ("modelhooks_seed = abc", "modelhooks_seed: expected an integer seed, 'random' or 'off', got 'abc'"),
        ("modelhooks_seed = -1", "modelhooks_seed: a torch seed is in [[]0, 2**64), got '-1'"),
        (
            "modelhooks_max_grad_norm = 1\nmodelhooks_min_grad_norm = 5",
            "modelhooks_min_grad_norm: min_grad_norm=5.0 is above max_grad_norm=1.0",
        ),
    ],
)
def test_bad_ini_values_are_usage_errors(
    pytester: pytest.Pytester, inprocess, ini: str, message: str
) -> None:
    pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = inprocess()
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

        @pytest.mark.modelhooks(seed="tomorrow")
        def test_bad_seed(model_sizes):
            pass
        """,
    )
    result = run("--strict-markers")
    result.assert_outcomes(errors=4)
    result.stdout.fnmatch_lines(
        ["*@pytest.mark.modelhooks(seed=...): expected an integer seed, 'random' or 'off', got 'tomorrow'*"]
    )
    result.stdout.fnmatch_lines(["*@pytest.mark.modelhooks: min_grad_norm=2.0 is above max_grad_norm=1.0*"])
    result.stdout.fnmatch_lines(
        ["*@pytest.mark.modelhooks(max_dead=...): expected a number in [[]0, 1[]], got 3*"]
    )
    result.stdout.fnmatch_lines(
        ["*@pytest.mark.modelhooks got unknown argument(s) stdev; known: std, max_dead*"]
    )
    assert "_plugin" not in result.stdout.str()  # no traceback into the plugin
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


SEEDED = """
import json, pathlib, pytest, torch

def draw(name):
    # what the test saw first from torch's RNG, one file per test (xdist runs them apart)
    pathlib.Path(f"draw-{name}.json").write_text(json.dumps(torch.rand(3).tolist()))

@pytest.fixture
def users_model():
    return torch.nn.Linear(2, 2)  # built before the test body: seeded too

def test_a(model_sizes):
    draw("a")

def test_b(activation_stats):
    draw("b")

def test_weights(users_model, model_summary):
    pathlib.Path("draw-weights.json").write_text(json.dumps(users_model.weight.flatten().tolist()))

@pytest.mark.modelhooks(seed=3)
def test_marked():
    draw("marked")

def test_plain():
    assert "torch" in __import__("sys").modules  # (imported by this file, not by the plugin)
"""


def _draws(pytester: pytest.Pytester) -> dict[str, list[float]]:
    import json

    files = pytester.path.glob("draw-*.json")
    return {path.stem.removeprefix("draw-"): json.loads(path.read_text()) for path in files}


def test_each_test_using_the_plugin_starts_from_the_same_torch_seed(run, pytester) -> None:
    import torch

    def first(seed: int) -> list[float]:
        torch.manual_seed(seed)
        return torch.rand(3).tolist()

    def weights(seed: int) -> list[float]:
        torch.manual_seed(seed)
        return torch.nn.Linear(2, 2).weight.flatten().tolist()

    write(pytester, "test_seeded", SEEDED)
    result = run()
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(["modelhooks: torch *, device cpu, seed 0"])
    draws = _draws(pytester)
    assert draws["a"] == draws["b"] == first(0)
    assert draws["weights"] == weights(0)
    assert draws["marked"] == first(3)  # the marker wins
    run("--modelhooks-seed=7").assert_outcomes(passed=5)
    draws = _draws(pytester)
    assert draws["a"] == draws["b"] == first(7) and draws["marked"] == first(3)
    run("--modelhooks-seed=off", "-k", "test_a or test_b").assert_outcomes(passed=2)
    draws = _draws(pytester)
    assert draws["a"] != draws["b"]  # not seeded: the RNG runs on from test to test


def test_a_random_seed_is_shown_and_shared_by_xdist_workers(run, pytester) -> None:
    import re

    import torch

    write(pytester, "test_seeded", SEEDED)
    result = run("--modelhooks-seed=random", "-k", "test_a or test_b", workers=2)
    result.assert_outcomes(passed=2)
    match = re.search(r"seed (\d+) \(random: rerun with --modelhooks-seed=(\d+)\)", result.stdout.str())
    assert match is not None and match.group(1) == match.group(2)
    torch.manual_seed(int(match.group(1)))
    draws = _draws(pytester)
    assert draws["a"] == draws["b"] == torch.rand(3).tolist()  # under xdist: one seed for all workers
