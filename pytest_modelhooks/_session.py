"""Run state of the pytest plugin: settings parsed once per session, per-test settings from the
``modelhooks`` marker, the leak guard. No torch import here: the torch side lives in
:mod:`pytest_modelhooks._fixtures`, imported the first time a fixture is used.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass, replace
from importlib import metadata
from typing import Any

import pytest

DEVICES = ("cpu", "cuda", "auto")
_MARKER_KEYS = (
    "std",
    "max_dead",
    "max_near_zero",
    "max_std_growth",
    "max_grad_norm",
    "min_grad_norm",
    "device",
    "seed",
)
# a test that asks for one of these (or carries the marker) starts with torch's RNG seeded
FIXTURES = frozenset(
    {
        "model_sizes",
        "model_summary",
        "hooked_model",
        "activation_stats",
        "gradient_stats",
        "model_snapshot",
        "modelhooks_device",
    }
)


@dataclass(frozen=True)
class Settings:
    """Effective modelhooks settings; precedence marker > command line > ini > defaults."""

    device: str = "cpu"
    std: tuple[float, float] | None = None
    max_dead: float | None = None
    max_near_zero: float | None = None
    max_std_growth: float | None = None
    max_grad_norm: float | None = None
    min_grad_norm: float | None = None
    plots_dir: str | None = None
    check_leaks: bool = False
    snapshot_rtol: float = 0.0
    snapshot_atol: float = 0.0
    seed: int | None = 0  # torch.manual_seed before each test using the plugin; None: left alone
    seed_source: str = "modelhooks_seed"  # where a random seed came from, for the header

    def check_bounds(self) -> dict[str, Any]:
        """The activation-check bounds, as keyword arguments."""
        return {
            "std": self.std,
            "max_dead": self.max_dead,
            "max_near_zero": self.max_near_zero,
            "max_std_growth": self.max_std_growth,
        }

    def grad_bounds(self) -> dict[str, Any]:
        """The gradient-check bounds, as keyword arguments of ``GradientStats.check``."""
        return {"max_norm": self.max_grad_norm, "min_norm": self.min_grad_norm}


SETTINGS = pytest.StashKey[Settings]()
CURRENT_ITEM = pytest.StashKey["pytest.Item | None"]()
WATCHED = pytest.StashKey[dict[int, Any]]()


# --------------------------------------------------------------------------- parsing


def _std(text: Any, where: str) -> tuple[float, float] | None:
    if text is None or text == "":
        return None
    try:
        if isinstance(text, str):
            low, high = (float(part) for part in text.split(","))
        else:
            low, high = (float(part) for part in text)
    except (TypeError, ValueError):
        raise pytest.UsageError(f"{where}: expected two numbers 'low,high', got {text!r}") from None
    if not (0 <= low <= high) or math.isnan(low) or math.isnan(high):
        raise pytest.UsageError(f"{where}: need 0 <= low <= high, got {text!r}")
    return low, high


def _fraction(text: Any, where: str) -> float | None:
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise pytest.UsageError(f"{where}: expected a number in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise pytest.UsageError(f"{where}: expected a number in [0, 1], got {text!r}")
    return value


def _positive(text: Any, where: str, *, allow_zero: bool = False) -> float | None:
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise pytest.UsageError(f"{where}: expected a positive number, got {text!r}") from None
    if value < 0 or (value == 0 and not allow_zero) or math.isnan(value):
        raise pytest.UsageError(f"{where}: expected a positive number, got {text!r}")
    return value


def _ordered_norms(settings: Settings, where: str) -> Settings:
    low, high = settings.min_grad_norm, settings.max_grad_norm
    if low is not None and high is not None and low > high:
        raise pytest.UsageError(f"{where}: min_grad_norm={low!r} is above max_grad_norm={high!r}")
    return settings


def _tolerance(config: pytest.Config, key: str) -> float:
    return _positive(config.getini(key), key, allow_zero=True) or 0.0


def _seed(text: Any, where: str) -> int | None:
    """An int seed, or None for "off"/"none"; "random" is resolved by :func:`configure`."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("off", "none")):
        return None
    if isinstance(text, bool):
        raise pytest.UsageError(f"{where}: expected an integer seed, 'random' or 'off', got {text!r}")
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise pytest.UsageError(
            f"{where}: expected an integer seed, 'random' or 'off', got {text!r}"
        ) from None
    if not 0 <= value < 2**64:
        raise pytest.UsageError(f"{where}: a torch seed is in [0, 2**64), got {text!r}")
    return value


def _device(text: Any, where: str) -> str:
    if text not in DEVICES:
        raise pytest.UsageError(f"{where}: expected one of {', '.join(DEVICES)}, got {text!r}")
    return str(text)


def configure(config: pytest.Config) -> None:
    """Parse and validate the ini keys and command-line options once."""
    option = config.option
    device = option.modelhooks_device or config.getini("modelhooks_device") or "cpu"
    settings = Settings(
        device=_device(device, "--modelhooks-device" if option.modelhooks_device else "modelhooks_device"),
        std=_std(config.getini("modelhooks_std_range"), "modelhooks_std_range"),
        max_dead=_fraction(config.getini("modelhooks_max_dead"), "modelhooks_max_dead"),
        max_near_zero=_fraction(config.getini("modelhooks_max_near_zero"), "modelhooks_max_near_zero"),
        max_std_growth=_positive(config.getini("modelhooks_max_std_growth"), "modelhooks_max_std_growth"),
        max_grad_norm=_positive(config.getini("modelhooks_max_grad_norm"), "modelhooks_max_grad_norm"),
        min_grad_norm=_positive(
            config.getini("modelhooks_min_grad_norm"), "modelhooks_min_grad_norm", allow_zero=True
        ),
        plots_dir=option.modelhooks_plots or config.getini("modelhooks_plots_dir") or None,
        check_leaks=bool(option.modelhooks_check_leaks),
        snapshot_rtol=_tolerance(config, "modelhooks_snapshot_rtol"),
        snapshot_atol=_tolerance(config, "modelhooks_snapshot_atol"),
    )
    seed_text = option.modelhooks_seed or config.getini("modelhooks_seed") or "0"
    where = "--modelhooks-seed" if option.modelhooks_seed else "modelhooks_seed"
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and "modelhooks_seed" in workerinput:
        # a pytest-xdist worker: the controller's seed, so "random" is one seed for the run
        settings = replace(settings, seed=workerinput["modelhooks_seed"])
    elif str(seed_text).strip().lower() == "random":
        settings = replace(settings, seed=random.randrange(2**32), seed_source="random")
    else:
        settings = replace(settings, seed=_seed(seed_text, where))
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistSeed(settings.seed), "modelhooks-xdist-seed")
    config.stash[SETTINGS] = _ordered_norms(settings, "modelhooks_min_grad_norm")
    config.stash[CURRENT_ITEM] = None


def settings_for(config: pytest.Config, item: pytest.Item | None) -> Settings:
    """The session settings with the test's ``@pytest.mark.modelhooks(...)`` applied."""
    settings = config.stash[SETTINGS]
    if item is None:
        return settings
    for marker in reversed(list(item.iter_markers("modelhooks"))):  # closest marker wins
        if marker.args:
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.modelhooks takes keyword arguments only")
        unknown = sorted(set(marker.kwargs) - set(_MARKER_KEYS))
        if unknown:
            raise pytest.UsageError(
                f"{item.nodeid}: @pytest.mark.modelhooks got unknown argument(s) {', '.join(unknown)}; "
                f"known: {', '.join(_MARKER_KEYS)}"
            )
        where = f"{item.nodeid}: @pytest.mark.modelhooks"
        changes: dict[str, Any] = {}
        for key, value in marker.kwargs.items():
            if key == "std":
                changes[key] = _std(value, f"{where}(std=...)") if value is not None else None
            elif key in ("max_dead", "max_near_zero"):
                changes[key] = _fraction(value, f"{where}({key}=...)")
            elif key in ("max_std_growth", "max_grad_norm"):
                changes[key] = _positive(value, f"{where}({key}=...)")
            elif key == "min_grad_norm":
                changes[key] = _positive(value, f"{where}({key}=...)", allow_zero=True)
            elif key == "seed":
                changes[key] = _seed(value, f"{where}(seed=...)")
            else:
                changes[key] = _device(value, f"{where}(device=...)")
        settings = _ordered_norms(replace(settings, **changes), where)
    return settings


def settings_in_test(config: pytest.Config, item: pytest.Item | None) -> Settings:
    """:func:`settings_for` from inside a test: a bad marker fails the test with its message
    alone (no traceback into the plugin)."""
    try:
        return settings_for(config, item)
    except pytest.UsageError as error:
        message = str(error)
    # failed outside the except block: the report shows the message once, not also the usage
    # error it replaced ("During handling of the above exception...")
    pytest.fail(message, pytrace=False)


def current_settings(config: pytest.Config) -> Settings:
    """Settings for the test running now (session settings outside a test)."""
    return settings_in_test(config, config.stash.get(CURRENT_ITEM, None))


# --------------------------------------------------------------------------- hooks


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


class _XdistSeed:
    """Hands the controller's seed to each pytest-xdist worker (registered only with xdist,
    whose hook this is)."""

    def __init__(self, seed: int | None) -> None:
        self.seed = seed

    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput["modelhooks_seed"] = self.seed


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


def check_leaks(item: pytest.Item) -> None:
    """After the test's fixtures are torn down: the leak guard, when asked for."""
    watched = item.stash.get(WATCHED, None)
    if not watched:
        return
    from pytest_modelhooks._fixtures import leaked_hooks

    problems = leaked_hooks(watched)
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
        from pytest_modelhooks._fixtures import FixtureState

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
    from pytest_modelhooks._fixtures import bound

    return FixtureCall("model_sizes", bound("model_sizes", config))


def bound_model_summary(config: pytest.Config) -> Any:
    from pytest_modelhooks._fixtures import bound

    return FixtureCall("model_summary", bound("model_summary", config))
