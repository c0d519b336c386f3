"""Run state of the pytest plugin: the report header, seeding before a test, the hook guard at
teardown, the fixture values. No torch import: the torch side is imported the first time a
fixture runs.
"""

from __future__ import annotations

import sys
from importlib import metadata
from typing import Any

__all__ = [
    "FixtureCall",
    "HookTracker",
    "bound_model_sizes",
    "bound_model_summary",
    "check_hooks",
    "reporting_extension",
    "enter_test",
    "report_header",
]

import pytest

from pytest_modelhooks._plugin.report import report_section
from pytest_modelhooks._plugin.settings import CURRENT_ITEM, FIXTURES, SETTINGS, WATCHED, settings_in_test


def report_header(config: pytest.Config) -> str:
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "not installed"
    device = config.stash[SETTINGS].device
    if device == "auto":
        # resolving "auto" needs torch; only do it if something already imported it
        if "torch" in sys.modules:
            device = "cuda" if sys.modules["torch"].cuda.is_available() else "cpu"
            device += " (auto)"
        else:
            device = "auto (cuda when available)"
    settings = config.stash[SETTINGS]
    if settings.seed is None:
        seed = "torch RNG not seeded"
    elif settings.seed_source == "random":
        seed = f"seed {settings.seed} (random: rerun with --modelhooks-seed={settings.seed})"
    else:
        seed = f"seed {settings.seed}"
    return f"modelhooks: torch {torch_version}, device {device}, {seed}"


def enter_test(item: pytest.Item) -> None:
    """Before the test's fixtures: note the test, and seed torch's RNG when the test uses the
    plugin (so a model built in a fixture of the user's is covered too). Tests that do not use
    it never import torch from here."""
    item.config.stash[CURRENT_ITEM] = item
    if (
        FIXTURES.isdisjoint(getattr(item, "fixturenames", ()))
        and item.get_closest_marker("modelhooks") is None
    ):
        return
    seed = settings_in_test(item.config, item).seed  # a bad marker errors the test here
    if seed is not None:
        import torch

        torch.manual_seed(seed)


def check_hooks(item: pytest.Item) -> None:
    """After the test's fixtures are torn down: the hook guard, when asked for
    (``--modelhooks-check-leaks``)."""
    watched = item.stash.get(WATCHED, None)
    if not watched:
        return
    from pytest_modelhooks._plugin.guard import added_hooks

    problems = added_hooks(watched)
    watched.clear()
    if problems:
        pytest.fail(
            "modelhooks: hooks added during the test are still registered:\n" + "\n".join(problems),
            pytrace=False,
        )


class FixtureCall:
    """A fixture's value: call it as the library function it stands for. Its repr names it,
    so a failing test's traceback shows ``activation_stats = <modelhooks fixture
    activation_stats(model, ...)>`` rather than a bound method at an address."""

    def __init__(self, name: str, call: Any, wraps: Any = None) -> None:
        self._name = name
        self._call = call
        self.__wrapped__ = wraps if wraps is not None else call  # help() and signatures
        self.__doc__ = getattr(self.__wrapped__, "__doc__", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        return self._call(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<modelhooks fixture {self._name}(model, ...)>"


class HookTracker:
    """Per-test owner of everything a function-scoped fixture registered."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        from pytest_modelhooks._plugin.fixtures import FixtureState

        self.state = FixtureState(request, settings_in_test(request.config, request.node))

    def hooked_model(self, model: Any, **kwargs: Any) -> Any:
        return self.state.hooked_model(model, **kwargs)

    def activation_stats(self, model: Any, **kwargs: Any) -> Any:
        return self.state.activation_stats(model, **kwargs)

    def gradient_stats(self, model: Any, **kwargs: Any) -> Any:
        return self.state.gradient_stats(model, **kwargs)

    def close(self) -> None:
        self.state.close()


def bound_model_sizes(config: pytest.Config) -> Any:
    from pytest_modelhooks._plugin.fixtures import bound

    return FixtureCall("model_sizes", bound("model_sizes", config))


def bound_model_summary(config: pytest.Config) -> Any:
    from pytest_modelhooks._plugin.fixtures import bound

    return FixtureCall("model_summary", bound("model_summary", config))


def reporting_extension(base: Any, item: pytest.Item) -> Any:
    """A subclass of the snapshot extension ``base``, made for one test, whose layer diffs go
    into that test's report (section ``modelhooks``), where pytest shows them whole."""

    def report_changes(self: Any, lines: list[str]) -> None:
        report_section(item, "\n".join(lines))

    attributes = {
        "report_changes": report_changes,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
    }
    return type(base.__name__, (base,), attributes)
