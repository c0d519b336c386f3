"""The torch side of the pytest plugin, imported the first time a modelhooks fixture runs."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import pytest
import torch
from torch import nn

from pytest_modelhooks._plugin.guard import watch
from pytest_modelhooks._plugin.report import report_section
from pytest_modelhooks._plugin.settings import Settings, current_settings
from pytest_modelhooks._torch import hook_entries
from pytest_modelhooks._tree import map_tensors
from pytest_modelhooks.compile.breaks import check_compiles
from pytest_modelhooks.errors import not_a_module
from pytest_modelhooks.findings import Finding, HealthError, format_findings
from pytest_modelhooks.hooks.core import Hook, HookFunc, Hooks, hook_output
from pytest_modelhooks.hooks.select import ModuleSpec, hookable
from pytest_modelhooks.inputs import is_input_data
from pytest_modelhooks.memory import MemoryReport, model_memory
from pytest_modelhooks.report.text import context_text
from pytest_modelhooks.sizes import model_sizes
from pytest_modelhooks.stats.activations import ActivationStats
from pytest_modelhooks.stats.gradients import GradientStats
from pytest_modelhooks.summary.build import model_summary

_UNSET: Any = object()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("modelhooks device is cuda, but CUDA is not available")
    return torch.device(name)


def _prepare(model: Any, device: torch.device, argument: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise not_a_module(argument, model)
    first = next(model.parameters(), None)
    if device.type != "cpu" and first is not None and first.device.type == "cpu":
        model.to(device)  # the configured device: tests hand over CPU-built models
    return model


def _inputs_to(value: Any, device: torch.device) -> Any:
    if device.type == "cpu" or value is None:
        return value
    return map_tensors(value, lambda tensor: tensor.to(device) if tensor.device.type == "cpu" else tensor)


_CORE: dict[str, tuple[Callable[..., Any], str]] = {
    "model_sizes": (model_sizes, "input"),
    "model_summary": (model_summary, "input_data"),
}


def bound(kind: str, config: pytest.Config) -> Callable[..., Any]:
    """``model_sizes`` / ``model_summary`` running on the configured device: the model (and
    the tensors of its ``input=`` / ``input_data=`` argument) move there first."""
    core, input_argument = _CORE[kind]
    size_argument = list(inspect.signature(core).parameters)[1]  # size / input_size
    options = set(inspect.signature(core).parameters) - {input_argument, size_argument}

    def on_device(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        settings = current_settings(config)
        device = resolve_device(settings.device)
        model = _prepare(model, device)
        watch(config, settings, model)
        # the input argument, data given in the size slot (model_sizes(model, x)), and the
        # forward's own keyword inputs: anything not an option (a shape holds no tensor)
        kwargs = {
            name: value if name in options else _inputs_to(value, device) for name, value in kwargs.items()
        }
        if args and is_input_data(args[0]):
            args = (_inputs_to(args[0], device), *args[1:])
        return core(model, *args, **kwargs)

    on_device.__name__ = on_device.__qualname__ = kind
    on_device.__doc__ = core.__doc__
    on_device.__wrapped__ = core  # type: ignore[attr-defined]  # inspect.signature shows core's
    return on_device


def _sanitize(nodeid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")[:180]


class FixtureState:
    """What one test's function-scoped fixtures created; all of it is removed by :meth:`close`."""

    def __init__(self, request: pytest.FixtureRequest, settings: Settings) -> None:
        self.request = request
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.owned: list[Any] = []
        self.registered: list[tuple[nn.Module, int]] = []

    def _take(self, model: Any) -> nn.Module:
        prepared = _prepare(model, self.device)
        watch(self.request.config, self.settings, prepared)
        return prepared

    def hooked_model(
        self,
        model: nn.Module,
        modules: ModuleSpec = None,
        hook_func: HookFunc | None = None,
        grad: bool = False,
        detach: bool = True,
        cpu: bool = False,
        clone: bool = False,
    ) -> Hooks:
        """Hooks on ``modules`` of ``model`` (default: its children), removed at teardown:
        with no ``hook_func`` each stores its module's output (its gradient with
        ``grad=True``); ``hooks["name"].stored``, ``hooks.stored``."""
        model = self._take(model)
        named = hookable(model, modules, default="children")
        selected = [module for _, module in named]
        hooks = Hooks([], _store, names=[])
        hooks.names = [name for name, _ in named]
        self.owned.append(hooks)
        for module in selected:
            hook = (
                hook_output(module, detach=detach, grad=grad, cpu=cpu, clone=clone)
                if hook_func is None
                else Hook(module, hook_func, is_forward=not grad, detach=detach, cpu=cpu, clone=clone)
            )
            hooks.hooks.append(hook)
            if hook._handle is not None:
                self.registered.append((module, hook._handle.id))
        return hooks

    def activation_stats(self, model: nn.Module, **kwargs: Any) -> FixtureActivationStats:
        stats = FixtureActivationStats(self._take(model), fixture=self, **kwargs)
        self.owned.append(stats)
        return stats

    def gradient_stats(self, model: nn.Module, **kwargs: Any) -> FixtureGradientStats:
        grads = FixtureGradientStats(self._take(model), fixture=self, **kwargs)
        self.owned.append(grads)
        return grads

    def report(self, text: str) -> None:
        report_section(self.request.node, text)

    def fail_check(
        self,
        error: HealthError,
        kind: str,
        draw: Callable[[Path], object] | None,
        recorded: ActivationStats | GradientStats,
    ) -> NoReturn:
        """A failed health check, raised again with the picture's path when plots are on
        (``draw`` writes it). The test's report gets what the error's table leaves out: the
        statistics of every layer (or parameter) recorded, the offending ones marked, so that a
        std creeping up towards the layer that broke its bound shows."""
        __tracebackhide__ = True
        text = str(error)
        path = self.plot_path(kind)
        if path is not None and draw is not None:
            try:
                draw(path)
                text += f"\nplot: {path}"
            except ImportError as missing:
                text += f"\nno plot: {missing}"
        if len(recorded):
            headline, plot = str(error).partition("\n")[0], text[len(str(error)) :]
            marked = {finding.layer for finding in error.findings}
            self.report(f"{headline}\n{context_text(recorded, marked)}{plot.lstrip()}")
        else:  # nothing recorded: the error says why, and there is no context
            self.report(text)
        raise HealthError(text, error.findings) from None

    def plot_path(self, suffix: str) -> Path | None:
        if not self.settings.plots_dir:
            return None
        return Path(self.settings.plots_dir) / f"{_sanitize(self.request.node.nodeid)}-{suffix}.png"

    def close(self) -> None:
        for owned in reversed(self.owned):
            owned.stop() if isinstance(owned, GradientStats) else owned.remove()
        survivors = [
            module
            for module, hook_id in self.registered
            if any(hook_id == held for _, held in hook_entries(module))
        ]
        if survivors:
            names = ", ".join(type(module).__name__ for module in survivors)
            pytest.fail(
                f"modelhooks: hooks registered through hooked_model survived teardown on: {names}",
                pytrace=False,
            )


def _store(module: nn.Module, args: Any, output: Any) -> Any:
    return output


class FixtureActivationStats(ActivationStats):
    """ActivationStats whose ``check()`` defaults to the configured bounds and reports failures
    in the test's report (table, and plot path when plots are on)."""

    def __init__(self, model: nn.Module, *, fixture: FixtureState, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self._fixture = fixture

    def check(
        self,
        *,
        std: Any = _UNSET,
        max_dead: Any = _UNSET,
        max_near_zero: Any = _UNSET,
        max_std_growth: Any = _UNSET,
        allow_nonfinite: bool = False,
        exclude: Any = _UNSET,
    ) -> None:
        """Like :meth:`ActivationStats.check`; bounds not given come from the
        ``modelhooks`` marker, the command line or the ini file."""
        __tracebackhide__ = True
        bounds = self._fixture.settings.check_bounds()
        given = {
            "std": std,
            "max_dead": max_dead,
            "max_near_zero": max_near_zero,
            "max_std_growth": max_std_growth,
            "exclude": exclude,
        }
        bounds.update({key: value for key, value in given.items() if value is not _UNSET})
        try:
            super().check(allow_nonfinite=allow_nonfinite, **bounds)
        except HealthError as error:
            self._fixture.fail_check(
                error,
                "activations",
                lambda path: self.plot(
                    path=path, std=bounds.get("std"), max_near_zero=bounds.get("max_near_zero")
                ),
                self,
            )


class FixtureGradientStats(GradientStats):
    """GradientStats whose ``check()`` defaults to the configured norm bounds and reports
    failures in the test's report (table, and plot path when plots are on)."""

    def __init__(self, model: nn.Module, *, fixture: FixtureState, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self._fixture = fixture

    def check(
        self,
        *,
        max_norm: Any = _UNSET,
        min_norm: Any = _UNSET,
        require_grad: bool = True,
        require_update: bool | None = None,
        exclude: Any = _UNSET,
    ) -> None:
        """Like :meth:`GradientStats.check`; norm bounds not given come from the ``modelhooks``
        marker (``max_grad_norm=``, ``min_grad_norm=``) or the ini file."""
        __tracebackhide__ = True
        bounds = self._fixture.settings.grad_bounds()
        given = {"max_norm": max_norm, "min_norm": min_norm, "exclude": exclude}
        bounds.update({key: value for key, value in given.items() if value is not _UNSET})
        try:
            super().check(require_grad=require_grad, require_update=require_update, **bounds)
        except HealthError as error:

            def draw(path: Path) -> object:
                return self.plot(path=path, max_norm=bounds.get("max_norm"), min_norm=bounds.get("min_norm"))

            self._fixture.fail_check(error, "gradients", draw if self.num_steps else None, self)


class FixtureMemoryReport(MemoryReport):
    """The ``model_memory`` fixture's report: ``check()`` defaults to the configured budget, and
    a failing check puts the whole report into the test's report."""

    budget: int | None = None
    node: Any = None

    def check(self, *, max_peak: object = None) -> None:
        __tracebackhide__ = True
        budget = self.budget if max_peak is None else max_peak
        if budget is None:
            pytest.fail(
                "model_memory: report.check() has no budget: pass max_peak= (such as '24GiB'), or "
                "set @pytest.mark.modelhooks(max_memory=...) or the ini key modelhooks_max_memory",
                pytrace=False,
            )
        try:
            super().check(max_peak=budget)
        except HealthError:
            if self.node is not None:
                report_section(self.node, str(self))
            raise


def memory_fixture(request: pytest.FixtureRequest) -> Callable[..., FixtureMemoryReport]:
    """The ``model_memory`` fixture's function: the library's, sized for the configured device
    (``cuda``: the CUDA allocator's blocks, with or without a GPU here) unless ``device=`` is
    given. The model is not moved: nothing runs on it."""

    def measure(model: nn.Module, *args: Any, **kwargs: Any) -> FixtureMemoryReport:
        __tracebackhide__ = True
        settings = current_settings(request.config)
        # sized for a GPU whether or not this machine has one: nothing runs on it
        gpu = settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())
        kwargs.setdefault("device", "cuda" if gpu else None)
        report = model_memory(model, *args, **kwargs)
        fixture_report = FixtureMemoryReport(**vars(report))
        fixture_report.budget, fixture_report.node = settings.max_memory, request.node
        return fixture_report

    measure.__name__ = measure.__qualname__ = "model_memory"
    measure.__doc__ = model_memory.__doc__
    measure.__wrapped__ = model_memory  # type: ignore[attr-defined]
    return measure


def compiles_fixture(request: pytest.FixtureRequest) -> Callable[..., list[Finding]]:
    """The ``model_compiles`` fixture's function: :func:`check_compiles` with the configured
    allowance of graph breaks; what it finds goes into the test's report, pass or fail."""

    def check(model: nn.Module, *inputs: Any, **options: Any) -> list[Finding]:
        __tracebackhide__ = True
        settings = current_settings(request.config)
        options.setdefault("max_graph_breaks", settings.max_graph_breaks)
        try:
            found = check_compiles(model, *inputs, **options)
        except HealthError as error:
            report_section(request.node, str(error))
            raise
        if found:
            allowed = options["max_graph_breaks"]
            text = f"torch.compile: {len(found)} place(s), within max_graph_breaks={allowed}\n"
            report_section(request.node, text + format_findings(found, unit="call"))
        return found

    check.__name__ = check.__qualname__ = "model_compiles"
    check.__doc__ = check_compiles.__doc__
    check.__wrapped__ = check_compiles  # type: ignore[attr-defined]
    return check
