"""The pytest plugin (entry point ``modelhooks``): fixtures, options, markers, report sections.

This module must stay cheap to import: pytest loads it for every run, including runs that never
touch a model, so torch is imported inside the fixtures only. Hook bodies are short and hand
the work to :mod:`pytest_modelhooks._plugin.session`; options and ini keys are parsed by
:mod:`pytest_modelhooks._plugin.settings`, the health bounds among them read from the one table
in :mod:`pytest_modelhooks.health.bounds`.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from pytest_modelhooks._plugin import report, session, settings
from pytest_modelhooks.health.bounds import BOUNDS

if TYPE_CHECKING:
    from syrupy.assertion import SnapshotAssertion


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("modelhooks", "pytest-modelhooks: model architecture tests")
    group.addoption(
        "--modelhooks-device",
        choices=settings.DEVICES,
        default=None,
        help="device the fixtures run models on: cpu, cuda or auto (cuda when available). "
        "ini: modelhooks_device; default cpu.",
    )
    group.addoption(
        "--modelhooks-plots",
        metavar="DIR",
        default=None,
        help="write plots of failing activation and gradient checks to DIR. ini: modelhooks_plots_dir.",
    )
    group.addoption(
        "--modelhooks-seed",
        metavar="SEED",
        default=None,
        help="torch.manual_seed(SEED) before each test that uses a modelhooks fixture or marker: "
        "an integer, 'random' (a new seed each run, shown in the header) or 'off'. "
        "ini: modelhooks_seed; default 0.",
    )
    group.addoption(
        "--modelhooks-threads",
        metavar="N",
        default=None,
        help="torch's CPU threads in each test process: auto (under pytest-xdist, each worker its "
        "share of the cores, unless OMP_NUM_THREADS is set), off, or a number. "
        "ini: modelhooks_threads; default auto.",
    )
    group.addoption(
        "--modelhooks-check-leaks",
        action="store_true",
        default=False,
        help="the hook guard: fail a test's teardown when a model it handed to a fixture has hooks "
        "added during the test.",
    )
    parser.addini("modelhooks_device", "cpu, cuda or auto", default="cpu")
    for bound in BOUNDS.values():
        parser.addini(bound.ini, f"default {bound.help} (marker: {bound.setting}=)", default="")
    parser.addini(
        "modelhooks_exclude",
        "modules the health checks do not judge (small by design): names or globs",
        default="",
    )
    parser.addini(
        "modelhooks_seed", "torch seed before each test using the plugin: int, random or off", default="0"
    )
    parser.addini(
        "modelhooks_max_memory",
        "the model_memory fixture's default budget for report.check(): 24GiB, 80GB, bytes "
        "(marker: max_memory=)",
        default="",
    )
    parser.addini(
        "modelhooks_max_graph_breaks",
        "the model_compiles fixture's default allowance of graph breaks (marker: max_graph_breaks=)",
        default="0",
    )
    parser.addini(
        "modelhooks_threads", "torch's CPU threads per test process: auto, off or a number", default="auto"
    )
    parser.addini("modelhooks_plots_dir", "where plots of failing health checks go", default="")
    parser.addini("modelhooks_snapshot_rtol", "relative tolerance for numbers in snapshots", default="0")
    parser.addini("modelhooks_snapshot_atol", "absolute tolerance for numbers in snapshots", default="0")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"modelhooks({settings.MARKER_SIGNATURE}): "
        "health-check bounds, device and torch seed for this test's modelhooks fixtures",
    )
    settings.configure(config)


def pytest_report_header(config: pytest.Config) -> str:
    return session.report_header(config)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    session.enter_test(item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    # before the report is made: a plain check's table joins the test's report sections
    if call.when == "call" and call.excinfo is not None:
        report.report_failed_check(item, call.excinfo.value)
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    # after the fixtures are torn down, so that the hook guard sees what they left
    try:
        result = yield
    finally:
        item.config.stash[settings.CURRENT_ITEM] = None
    session.check_hooks(item)
    return result


@pytest.fixture(scope="session")
def model_sizes(pytestconfig: pytest.Config) -> Any:
    """:func:`pytest_modelhooks.model_sizes` on the configured device. Session-scoped (it holds
    no state), so it is safe inside Hypothesis ``@given`` tests."""
    return session.bound_model_sizes(pytestconfig)


@pytest.fixture(scope="session")
def model_summary(pytestconfig: pytest.Config) -> Any:
    """:func:`pytest_modelhooks.model_summary` on the configured device (session-scoped)."""
    return session.bound_model_summary(pytestconfig)


@pytest.fixture
def modelhooks_device(request: pytest.FixtureRequest) -> Any:
    """The ``torch.device`` the fixtures run models on (marker ``device=``, then
    ``--modelhooks-device``, then the ini key): make inputs and targets there, and one test runs
    on the CPU and on a GPU alike. Skips the test when CUDA is asked for but absent."""
    from pytest_modelhooks._plugin.fixtures import resolve_device

    return resolve_device(settings.settings_in_test(request.config, request.node).device)


@pytest.fixture
def hooked_model(request: pytest.FixtureRequest) -> Iterator[Any]:
    """``hooks = hooked_model(model, modules=..., hook_func=None, grad=False)``: a ``Hooks``
    (outputs stored by default); every hook is removed at teardown, also when the test fails."""
    tracker = session.HookTracker(request)
    yield session.FixtureCall("hooked_model", tracker.hooked_model, wraps=tracker.state.hooked_model)
    tracker.close()


@pytest.fixture
def activation_stats(request: pytest.FixtureRequest) -> Iterator[Any]:
    """``with activation_stats(model, ...) as stats:`` records; ``stats.check()`` uses the
    bounds from the marker, command line or ini; a failing check's table (and plot) goes into
    the test report."""
    from pytest_modelhooks.stats.activations import ActivationStats

    tracker = session.HookTracker(request)
    yield session.FixtureCall("activation_stats", tracker.activation_stats, wraps=ActivationStats)
    tracker.close()


@pytest.fixture
def gradient_stats(request: pytest.FixtureRequest) -> Iterator[Any]:
    """``with gradient_stats(model) as grads:`` records gradient statistics after each
    backward; ``grads.check()`` names unused, vanishing and exploding gradients."""
    from pytest_modelhooks.stats.gradients import GradientStats

    tracker = session.HookTracker(request)
    yield session.FixtureCall("gradient_stats", tracker.gradient_stats, wraps=GradientStats)
    tracker.close()


@pytest.fixture
def model_memory(request: pytest.FixtureRequest) -> Any:
    """``report = model_memory(model, input, ...)``: :func:`pytest_modelhooks.model_memory`, sized
    for the configured device; ``report.check()`` takes its budget from the marker's
    ``max_memory=`` or the ini key ``modelhooks_max_memory``, and a failing check puts the whole
    report into the test's report."""
    from pytest_modelhooks._plugin.fixtures import memory_fixture

    return memory_fixture(request)


@pytest.fixture
def model_compiles(request: pytest.FixtureRequest) -> Any:
    """``found = model_compiles(model, *inputs, ...)``: :func:`pytest_modelhooks.check_compiles`
    with ``max_graph_breaks`` from the marker or the ini key ``modelhooks_max_graph_breaks``
    (default 0). The breaks and recompilations it finds, allowed or not, go into the test's
    report; it returns them (a list of findings a ``model_snapshot`` stores)."""
    from pytest_modelhooks._plugin.fixtures import compiles_fixture

    return compiles_fixture(request)


@pytest.fixture
def model_snapshot(snapshot: SnapshotAssertion, request: pytest.FixtureRequest) -> SnapshotAssertion:
    """syrupy's ``snapshot`` with :class:`~pytest_modelhooks.snapshot.ModelSnapshotExtension`:
    ``assert model_summary(net, input_size=...) == model_snapshot``. A mismatch's layer diff
    goes into the test's report whole, whatever the verbosity."""
    from pytest_modelhooks.snapshot import ModelSnapshotExtension, model_snapshot_assertion

    current = settings.settings_in_test(request.config, request.node)
    tolerant = ModelSnapshotExtension.with_tolerances(current.snapshot_rtol, current.snapshot_atol)
    return model_snapshot_assertion(snapshot, session.reporting_extension(tolerant, request.node))
