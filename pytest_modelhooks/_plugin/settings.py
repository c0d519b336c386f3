"""The plugin's settings: ini keys, options and the ``modelhooks`` marker, parsed and validated
once. No torch import.

The health bounds come from :data:`pytest_modelhooks.health.bounds.BOUNDS`: their ini keys,
marker keys and parsing are the library's own, so the marker, the ini file and ``check()`` take
the same values and say the same thing about a bad one.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from pytest_modelhooks._plugin.threads import apply_threads, parse_threads
from pytest_modelhooks.health.bounds import ACTIVATION_BOUNDS, BOUNDS, GRADIENT_BOUNDS, Bound, check_order
from pytest_modelhooks.units import parse_bytes

__all__ = [
    "CURRENT_ITEM",
    "DEVICES",
    "FIXTURES",
    "MARKER_KEYS",
    "MARKER_SIGNATURE",
    "SETTINGS",
    "WATCHED",
    "Settings",
    "configure",
    "current_settings",
    "settings_for",
    "settings_in_test",
]

DEVICES = ("cpu", "cuda", "auto")
MARKER_KEYS = (
    *(bound.setting for bound in BOUNDS.values()),
    "exclude",
    "max_memory",
    "max_graph_breaks",
    "device",
    "seed",
)
#: The marker's arguments as ``--markers`` lists them.
MARKER_SIGNATURE = ", ".join(
    [
        f"{bound.setting}=(low, high)" if bound.kind == "range" else f"{bound.setting}=..."
        for bound in BOUNDS.values()
    ]
    + ["exclude=...", "max_memory=...", "max_graph_breaks=...", "device=...", "seed=..."]
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
        "model_memory",
        "model_compiles",
    }
)


@dataclass(frozen=True)
class Settings:
    """Effective modelhooks settings; precedence marker > command line > ini > defaults.
    ``bounds`` holds the health bounds set, keyed by each bound's ``setting`` (see
    :data:`BOUNDS`): a new bound needs no field here."""

    device: str = "cpu"
    bounds: Mapping[str, Any] = field(default_factory=dict)
    exclude: Any = None  # modules whose outputs and gradients the checks do not judge
    max_memory: int | None = None  # bytes: the default budget of the model_memory fixture's check()
    max_graph_breaks: int = 0  # the model_compiles fixture's default allowance
    plots_dir: str | None = None
    hook_guard: bool = False  # --modelhooks-check-leaks
    snapshot_rtol: float = 0.0
    snapshot_atol: float = 0.0
    seed: int | None = 0  # torch.manual_seed before each test using the plugin; None: left alone
    seed_source: str = "modelhooks_seed"  # where a random seed came from, for the header

    def check_bounds(self) -> dict[str, Any]:
        """The activation-check bounds, as keyword arguments of ``ActivationStats.check``."""
        return {bound.name: self.bounds.get(bound.setting) for bound in ACTIVATION_BOUNDS} | {
            "exclude": self.exclude
        }

    def grad_bounds(self) -> dict[str, Any]:
        """The gradient-check bounds, as keyword arguments of ``GradientStats.check``."""
        return {bound.name: self.bounds.get(bound.setting) for bound in GRADIENT_BOUNDS} | {
            "exclude": self.exclude
        }


SETTINGS = pytest.StashKey[Settings]()
CURRENT_ITEM = pytest.StashKey["pytest.Item | None"]()
WATCHED = pytest.StashKey[dict[int, Any]]()


# --------------------------------------------------------------------------- parsing


def _bound(bound: Bound, text: Any, where: str) -> Any:
    try:
        return bound.parse(text, where)
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None


def _tolerance(config: pytest.Config, key: str) -> float:
    text = config.getini(key)
    try:
        value = float(text) if text not in (None, "") else 0.0
    except ValueError:
        value = -1.0
    if not value >= 0:  # NaN too
        raise pytest.UsageError(f"{key}: expected a positive number, got {text!r}")
    return value


def _seed(text: Any, where: str) -> int | None:
    """An int seed, or None for "off"/"none"; "random" is resolved by :func:`configure`."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("off", "none")):
        return None
    expected = f"{where}: expected an integer seed, 'random' or 'off', got {text!r}"
    if isinstance(text, bool):
        raise pytest.UsageError(expected)
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise pytest.UsageError(expected) from None
    if not 0 <= value < 2**64:
        raise pytest.UsageError(f"{where}: a torch seed is in [0, 2**64), got {text!r}")
    return value


def _exclude(value: Any, where: str) -> Any:
    """A module spec (as ``modules=`` takes); from the ini file, comma-separated names and globs."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        names = [part.strip() for part in value.replace("\n", ",").split(",") if part.strip()]
        if not names:
            raise pytest.UsageError(f"{where}: expected module names or globs, got {value!r}")
        return names
    return value


def _max_memory(value: Any, where: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return parse_bytes(value, where)
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None


def _max_graph_breaks(value: Any, where: str) -> int:
    if value is None or value == "":
        return 0
    try:
        count = int(str(value).strip()) if not isinstance(value, bool) else -1
    except ValueError:
        count = -1
    if count < 0:
        raise pytest.UsageError(f"{where}: expected a non-negative integer, got {value!r}")
    return count


def _device(text: Any, where: str) -> str:
    if text not in DEVICES:
        raise pytest.UsageError(f"{where}: expected one of {', '.join(DEVICES)}, got {text!r}")
    return str(text)


def _ordered(settings: Settings, where: str) -> Settings:
    try:
        low, high = settings.bounds.get("min_grad_norm"), settings.bounds.get("max_grad_norm")
        check_order(low, high, "min_grad_norm", "max_grad_norm")
    except ValueError as error:
        raise pytest.UsageError(f"{where}: {error}") from None
    return settings


class XdistSeed:
    """Hands the controller's seed to each pytest-xdist worker (registered only with xdist,
    whose hook this is)."""

    def __init__(self, seed: int | None) -> None:
        self.seed = seed

    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput["modelhooks_seed"] = self.seed


def configure(config: pytest.Config) -> None:
    """Parse and validate the ini keys and command-line options once."""
    option = config.option
    device = option.modelhooks_device or config.getini("modelhooks_device") or "cpu"
    bounds = {bound.setting: _bound(bound, config.getini(bound.ini), bound.ini) for bound in BOUNDS.values()}
    settings = Settings(
        device=_device(device, "--modelhooks-device" if option.modelhooks_device else "modelhooks_device"),
        plots_dir=option.modelhooks_plots or config.getini("modelhooks_plots_dir") or None,
        hook_guard=bool(option.modelhooks_check_leaks),
        exclude=_exclude(config.getini("modelhooks_exclude"), "modelhooks_exclude"),
        max_memory=_max_memory(config.getini("modelhooks_max_memory"), "modelhooks_max_memory"),
        max_graph_breaks=_max_graph_breaks(
            config.getini("modelhooks_max_graph_breaks"), "modelhooks_max_graph_breaks"
        ),
        snapshot_rtol=_tolerance(config, "modelhooks_snapshot_rtol"),
        snapshot_atol=_tolerance(config, "modelhooks_snapshot_atol"),
        bounds=bounds,
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
        config.pluginmanager.register(XdistSeed(settings.seed), "modelhooks-xdist-seed")
    threads_text = option.modelhooks_threads or config.getini("modelhooks_threads") or "auto"
    where = "--modelhooks-threads" if option.modelhooks_threads else "modelhooks_threads"
    apply_threads(parse_threads(threads_text, where))
    config.stash[SETTINGS] = _ordered(settings, "modelhooks_min_grad_norm")
    config.stash[CURRENT_ITEM] = None


_BY_SETTING = {bound.setting: bound for bound in BOUNDS.values()}


def settings_for(config: pytest.Config, item: pytest.Item | None) -> Settings:
    """The session settings with the test's ``@pytest.mark.modelhooks(...)`` applied."""
    settings = config.stash[SETTINGS]
    if item is None:
        return settings
    for marker in reversed(list(item.iter_markers("modelhooks"))):  # closest marker wins
        if marker.args:
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.modelhooks takes keyword arguments only")
        unknown = sorted(set(marker.kwargs) - set(MARKER_KEYS))
        if unknown:
            raise pytest.UsageError(
                f"{item.nodeid}: @pytest.mark.modelhooks got unknown argument(s) {', '.join(unknown)}; "
                f"known: {', '.join(MARKER_KEYS)}"
            )
        where = f"{item.nodeid}: @pytest.mark.modelhooks"
        changes: dict[str, Any] = {}
        bounds = dict(settings.bounds)
        for key, value in marker.kwargs.items():
            if key in _BY_SETTING:
                bounds[key] = _bound(_BY_SETTING[key], value, f"{where}({key}=...)")
            elif key == "seed":
                changes[key] = _seed(value, f"{where}(seed=...)")
            elif key == "exclude":
                changes[key] = _exclude(value, f"{where}(exclude=...)")
            elif key == "max_memory":
                changes[key] = _max_memory(value, f"{where}(max_memory=...)")
            elif key == "max_graph_breaks":
                changes[key] = _max_graph_breaks(value, f"{where}(max_graph_breaks=...)")
            else:
                changes[key] = _device(value, f"{where}(device=...)")
        settings = _ordered(replace(settings, bounds=bounds, **changes), where)
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
