"""Loading the plugin: no torch at import, the option group, the header, the marker."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_importing_the_plugin_does_not_import_torch() -> None:
    code = "import sys, pytest_modelhooks.plugin, pytest_modelhooks; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "False"


def test_help_shows_the_option_group_and_the_header_names_torch_and_device(
    pytester: pytest.Pytester, inprocess
) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(
        [
            "*modelhooks*",
            "*--modelhooks-device*",
            "*--modelhooks-plots=DIR*",
            "*--modelhooks-seed=SEED*",
            "*--modelhooks-check-leaks*",
        ]
    )
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    header = inprocess()
    header.stdout.fnmatch_lines(["modelhooks: torch *, device cpu, seed 0"])
    unseeded = inprocess("--modelhooks-seed=off")
    unseeded.stdout.fnmatch_lines(["modelhooks: torch *, device cpu, torch RNG not seeded"])


def test_a_run_that_uses_no_fixture_does_not_import_torch(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_plain="""
        import sys
        def test_plain():
            assert "torch" not in sys.modules
        """
    )
    pytester.runpytest_subprocess("-p", "no:randomly").assert_outcomes(passed=1)


def test_the_marker_is_registered_for_strict_markers(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.modelhooks(std=(low, high), max_dead=*"])


def test_fixture_values_read_well_in_tracebacks_and_keep_their_signatures(
    pytester: pytest.Pytester, inprocess
) -> None:
    pytester.makepyfile(
        test_repr="""
        import inspect

        def test_signatures(model_sizes, model_summary, activation_stats, gradient_stats, hooked_model):
            assert "size" in inspect.signature(model_sizes).parameters
            assert "input_size" in inspect.signature(model_summary).parameters
            assert "model" in inspect.signature(activation_stats).parameters
            assert "fused" in inspect.signature(gradient_stats).parameters
            assert "hook_func" in inspect.signature(hooked_model).parameters
            assert all(
                fixture.__doc__
                for fixture in (model_sizes, model_summary, activation_stats, gradient_stats, hooked_model)
            )

        def test_fails(activation_stats, model_sizes):
            assert False
        """
    )
    result = inprocess()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "activation_stats = <modelhooks fixture activation_stats(model, ...)>",
            "model_sizes = <modelhooks fixture model_sizes(model, ...)>",
        ]
    )
    result.stdout.no_fnmatch_line("*object at 0x*")
    result.stdout.no_fnmatch_line("*function*at 0x*")
