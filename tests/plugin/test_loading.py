"""Loading the plugin: no torch at import, the option group, the header, the marker."""

from __future__ import annotations

import subprocess
import sys

import pytest


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


def test_the_marker_is_registered_for_strict_markers(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.modelhooks(std=(low, high), max_dead=*"])
