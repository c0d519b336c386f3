"""The device path's batched reductions (outputs held to the batch's end, gradients to the
backward's end), run on the CPU by forcing the device path: the same numbers as reducing each
tensor in its hook, and kernels that grow with the shapes, not with the modules."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from pytest_modelhooks import ActivationStats, GradientStats
from pytest_modelhooks._torch import TorchDispatchMode
from pytest_modelhooks._tree import tensor_leaves
from pytest_modelhooks.stats import STATISTICS, activations, gradients, reduce
from pytest_modelhooks.stats import held as held_module
from tests import zoo
from tests.helpers import untouched


@pytest.fixture
def device_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(activations, "on_host", lambda x: False)
    monkeypatch.setattr(gradients, "on_host", lambda grad: False)


class Kernels(TorchDispatchMode):
    """Counts the ops that launch a kernel (no views, no bare allocations)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not func.is_view and func.__name__.split(".")[0] not in {"detach", "empty", "empty_strided"}:
            self.count += 1
        return func(*args, **(kwargs or {}))


def assert_same(expected: ActivationStats, got: ActivationStats) -> None:
    assert got.series_names == expected.series_names
    for one, other in zip(expected, got, strict=True):
        for statistic in STATISTICS:
            torch.testing.assert_close(other[statistic], one[statistic], equal_nan=True, rtol=1e-5, atol=1e-6)
        assert other.dead == one.dead and other.channels == one.channels, one.name
        assert torch.equal(other.ran, one.ran), one.name


def record(model: nn.Module, batches: list[torch.Tensor], **options: Any) -> ActivationStats:
    with ActivationStats(model, modules="all", **options) as stats:
        for batch in batches:
            model(batch)
    return stats


@pytest.mark.usefixtures("device_path")
def test_held_outputs_give_the_numbers_of_the_hooks() -> None:
    """BatchNorm outputs changed in place by ReLU(inplace=True) and by a residual ``+=`` after
    their hooks are told apart on the first batch and copied; the rest are held as they are."""
    torch.manual_seed(0)
    model = zoo.ResNetish()
    batches = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    batches[2][0, 0, 0, 0] = float("nan")  # non-finite values downstream
    in_hooks = record(model, batches, max_held=0)
    with untouched(model, values=False):  # (training: BatchNorm's running statistics move)
        held = record(model, batches)
    assert_same(in_hooks, held)
    changed = {held.series_names[series] for series in held._in_place}
    assert changed and all(".bn" in name for name in changed)
    assert held._holdable and not held._holdable & held._in_place
    assert not held._held  # nothing held past the batch


@pytest.mark.usefixtures("device_path")
def test_kernels_per_batch_do_not_grow_with_depth() -> None:
    def blocks(depth: int) -> nn.Module:
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.LayerNorm(16)]
        return nn.Sequential(*layers)

    def kernels(model: nn.Module, **options: Any) -> int:
        batch = torch.randn(8, 16)
        with torch.no_grad():
            plain = Kernels()
            with plain:
                model(batch)
            with ActivationStats(model, **options):
                model(batch)  # the first batch learns which outputs keep their values
                counted = Kernels()
                with counted:
                    model(batch)
        return counted.count - plain.count

    shallow, deep = blocks(2), blocks(8)
    assert kernels(shallow) == kernels(deep) < 40
    assert kernels(deep, max_held=0) > 3 * kernels(shallow, max_held=0)


@pytest.mark.usefixtures("device_path")
def test_a_small_budget_reduces_mid_batch_with_the_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = zoo.ResNetish()
    batches = [torch.randn(2, 3, 16, 16) for _ in range(2)]
    in_hooks = record(model, batches, max_held=0)
    most = [0]
    reduce_held = activations.ActivationStats._reduce_held

    def watched(self: ActivationStats) -> None:
        most[0] = max(most[0], self._held.bytes)
        reduce_held(self)

    monkeypatch.setattr(activations.ActivationStats, "_reduce_held", watched)
    with torch.no_grad():
        small = record(model, batches, max_held="4KiB")
    largest = max(2 * 16 * 16 * 16 * 4, 2 * 10 * 4)  # the biggest output held, in bytes
    assert 0 < most[0] <= 4096 + 2 * largest  # a copy and the tensor watched beside it
    assert_same(in_hooks, small)


@pytest.mark.usefixtures("device_path")
def test_inference_mode_holds_copies() -> None:
    torch.manual_seed(0)
    model = zoo.ResNetish().eval()
    batches = [torch.randn(2, 3, 16, 16) for _ in range(2)]
    with torch.inference_mode():
        in_hooks = record(model, batches, max_held=0)
        held = record(model, batches)
    assert_same(in_hooks, held)
    assert not held._holdable  # no version counters: nothing can be held as it is


class SometimesInPlace(nn.Module):
    """Changes its first layer's output in place after the hook, from the third call on."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 8)
        self.second = nn.Linear(8, 2)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        hidden = self.first(x)
        if self.calls >= 3:
            hidden.mul_(2.0)
        return self.second(hidden)


@pytest.mark.usefixtures("device_path")
def test_an_output_changed_in_place_only_later_misses_that_batch() -> None:
    """A tensor held as it is that then changes (the model took another path) cannot be
    measured any more: that batch has no row for it (``ran`` says so), and from the next batch
    on it is copied in its hook."""
    torch.manual_seed(0)
    model = SometimesInPlace()
    with torch.no_grad(), ActivationStats(model) as stats:
        for _ in range(4):
            model(torch.randn(5, 4))
    first = stats["first"]
    assert first.ran.tolist() == [True, True, False, True]
    assert stats.series_names.index("first") in stats._in_place
    assert stats["second"].ran.all()


@pytest.mark.usefixtures("device_path")
def test_a_failed_forward_lets_the_held_outputs_go() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(4, 2))  # the last one mismatches
    with ActivationStats(model) as stats:
        for _ in range(2):
            with pytest.raises(RuntimeError):
                model(torch.randn(2, 4))
        assert not stats._held


def test_max_held_is_checked() -> None:
    with pytest.raises(ValueError, match=r"max_held='lots'"):
        ActivationStats(zoo.mlp(), max_held="lots")
    assert ActivationStats(zoo.mlp(), max_held="1GiB").max_held == 2**30


@pytest.mark.usefixtures("device_path")
def test_held_gradients_give_the_numbers_of_the_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reduced at the end of each backward: clipping afterwards does not hide the sizes."""
    torch.manual_seed(0)
    model = zoo.ResNetish()
    batches = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))) for _ in range(3)]

    def steps() -> GradientStats:
        torch.manual_seed(1)
        with GradientStats(model) as grads:
            for x, y in batches:
                model.zero_grad()
                (nn.functional.cross_entropy(model(x), y) * 100).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        return grads

    held = steps()
    assert not held._held and held.num_steps == 3
    assert all(raw for _, _, raw in held._steps)  # one tensor of raw rows per step
    monkeypatch.setattr(gradients, "on_host", lambda grad: True)
    monkeypatch.setattr(gradients, "grad_on_host", reduce.grad_on_device)
    in_hooks = steps()
    torch.testing.assert_close(held._gather(), in_hooks._gather(), rtol=1e-5, atol=1e-7)
    assert float(held._gather()[0].nan_to_num().pow(2).sum(dim=0).sqrt().min()) > 1e-2  # before clipping


@pytest.mark.usefixtures("device_path")
def test_gradient_kernels_per_step_do_not_grow_with_depth() -> None:
    def kernels(depth: int) -> int:
        model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(depth)])
        batch = torch.randn(4, 16)
        plain = Kernels()
        with plain:
            model(batch).sum().backward()
        model.zero_grad(set_to_none=True)  # (backward then writes .grad afresh, as it did above)
        with GradientStats(model):
            counted = Kernels()
            with counted:
                model(batch).sum().backward()
        return counted.count - plain.count

    assert kernels(2) == kernels(8)


@pytest.mark.usefixtures("device_path")
def test_held_gradients_beside_a_sparse_one() -> None:
    """A sparse gradient is reduced in its hook; the dense ones at the backward's end; one
    step's rows still line up with their parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(12, 2))
    tokens = torch.randint(0, 10, (5, 3))
    with GradientStats(model) as grads:
        model(tokens).sum().backward()
    weight = model[2].weight.grad
    assert weight is not None
    torch.testing.assert_close(float(grads["2.weight"].norm[0]), float(weight.norm()), rtol=1e-6, atol=0)
    embedding = model[0].weight.grad
    assert embedding is not None
    assert float(grads["0.weight"].norm[0]) == pytest.approx(float(embedding.to_dense().norm()), rel=1e-6)


@pytest.mark.usefixtures("device_path")
def test_dead_units_across_batches_split_differently() -> None:
    """The first batch holds copies and the tensors beside them, so a small budget splits it
    elsewhere than the next ones: the running maxima per channel still cover every batch, and
    from the second batch on each group is updated with one op."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    batches = [torch.randn(8, 4) for _ in range(4)]
    with torch.no_grad():
        in_hooks = record(model, batches, max_held=0)
        held = record(model, batches, max_held="3KiB")
    assert_same(in_hooks, held)
    assert not held._channel_max._rows  # every series in a group


class Scalars(nn.Module):
    """Scalar parameters and a module returning a 0-d tensor: rows of one value."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.shift = nn.Parameter(torch.tensor(-1.0))
        self.body = nn.Linear(3, 3)
        self.pool = Mean()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(x) * self.scale + self.shift)


class Mean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean()


@pytest.mark.usefixtures("device_path")
def test_zero_dim_tensors_are_rows_of_one_value(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = Scalars()
    batches = [torch.randn(4, 3) for _ in range(3)]
    with ActivationStats(model, modules="all") as held, GradientStats(model) as grads:
        for batch in batches:
            model(batch).backward()
    monkeypatch.setattr(activations, "on_host", lambda x: True)
    monkeypatch.setattr(gradients, "on_host", lambda grad: True)
    model.zero_grad()
    with ActivationStats(model, modules="all") as host, GradientStats(model) as host_grads:
        for batch in batches:
            model(batch).backward()
    assert_same(host, held)
    assert float(held["pool"].std[2]) == 0.0
    torch.testing.assert_close(grads._gather(), host_grads._gather(), rtol=1e-5, atol=1e-7)
    assert float(grads["scale"].std[0]) == 0.0


@pytest.mark.usefixtures("device_path")
def test_fused_held_groups_match_the_separate_passes() -> None:
    """``fused=True`` on the device path: one compiled pass per group of held outputs."""
    import warnings

    torch.manual_seed(0)
    model = zoo.ResNetish()
    batches = [torch.randn(3, 3, 16, 16) for _ in range(3)]
    batches[1][0, 0, 0, 0] = float("inf")
    separate = record(model, batches, max_held=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = record(model, batches, fused=True)
    if any("could not build the fused kernel" in str(warning.message) for warning in caught):
        pytest.skip("torch.compile cannot build kernels on this machine")
    assert fused.fused and fused._held.fused is not None
    assert_same(separate, fused)


@pytest.mark.usefixtures("device_path")
def test_fused_held_gradients_match_the_separate_passes() -> None:
    import warnings

    torch.manual_seed(0)
    model = Scalars()  # (a one-value parameter: std 0 in the compiled pass too)
    batches = [torch.randn(4, 3) for _ in range(2)]

    def steps(fused: bool) -> GradientStats:
        with GradientStats(model, fused=fused) as grads:
            for batch in batches:
                model.zero_grad()
                model(batch).backward()
        return grads

    separate = steps(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = steps(True)
    if any("could not build the fused kernel" in str(warning.message) for warning in caught):
        pytest.skip("torch.compile cannot build kernels on this machine")
    assert fused.fused
    torch.testing.assert_close(fused._gather(), separate._gather(), rtol=1e-5, atol=1e-7)
    assert float(fused["scale"].std[0]) == 0.0


@pytest.mark.usefixtures("device_path")
@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_every_zoo_model_records_the_same_held_or_in_its_hooks(name: str) -> None:
    """Nested outputs (tuples, dicts, dataclasses, an LSTM's state), a module called twice,
    tied weights, several inputs, mixed train/eval modes: two batches and their gradients."""
    model, example = zoo.build(name)
    inputs = example if isinstance(example, tuple) else (example,)

    def steps(**options: Any) -> tuple[ActivationStats, GradientStats]:
        torch.manual_seed(1)  # (the same dropout draws both times)
        with ActivationStats(model, modules="all", **options) as stats, GradientStats(model) as grads:
            for _ in range(2):
                model.zero_grad()
                leaves = [leaf for _, leaf in tensor_leaves(model(*inputs)) if leaf.is_floating_point()]
                loss = sum(leaf.float().sum() for leaf in leaves)
                if isinstance(loss, torch.Tensor) and loss.requires_grad:
                    loss.backward()
        return stats, grads

    with untouched(model, values=False):
        held, held_grads = steps()
    in_hooks, hook_grads = steps(max_held=0)
    assert held.num_batches == in_hooks.num_batches == 2
    assert_same(in_hooks, held)
    got, expected = held_grads._gather(), hook_grads._gather()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7, equal_nan=True)


class FailingBackward(torch.autograd.Function):
    """Passes values through; its backward raises (a bug deep in a custom op)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("planted failure in backward")


class Boom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.armed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FailingBackward.apply(x) if self.armed else x


@pytest.mark.usefixtures("device_path")
def test_a_backward_that_raises_still_records_the_gradients_it_wrote() -> None:
    """The engine's final callback never runs when backward raises: the gradients it had
    written (the last layer's) are reduced when the step closes, and the next backward is
    recorded as usual."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), Boom(), nn.Linear(8, 2))
    with GradientStats(model) as grads:
        with pytest.raises(RuntimeError, match="planted failure"):
            model(torch.randn(3, 4)).sum().backward()
        written = model[2].weight.grad
        assert written is not None and model[0].weight.grad is None
        expected = float(written.norm())
        model[1].armed = False
        model.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
    assert grads.num_steps == 2 and not grads._held
    assert float(grads["2.weight"].norm[0]) == pytest.approx(expected, rel=1e-6)
    assert math.isnan(float(grads["0.weight"].norm[0])) and float(grads["0.weight"].norm[1]) > 0


@pytest.mark.usefixtures("device_path")
def test_every_other_batch_held_or_in_its_hooks() -> None:
    torch.manual_seed(0)
    model = zoo.ResNetish()
    batches = [torch.randn(2, 3, 16, 16) for _ in range(5)]
    in_hooks = record(model, batches, max_held=0, every=2)
    held = record(model, batches, every=2)
    assert held.num_batches == 3 and held.stats.shape[2] == 3
    assert_same(in_hooks, held)


@pytest.mark.usefixtures("device_path")
def test_under_vmap_outputs_are_reduced_in_their_hooks() -> None:
    """A torch.func level's tensor must not outlive its hook: under vmap nothing is held, and
    the statistics are the whole batch's, as on the CPU."""
    from torch.func import vmap

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(0), nn.Linear(6 * 36, 4))
    batch = torch.randn(5, 3, 8, 8)
    with ActivationStats(model) as stats:
        for _ in range(2):
            vmap(model)(batch)
    assert not stats._holdable
    direct = model[0](batch).detach().double()
    assert float(stats["0"].mean[1]) == pytest.approx(float(direct.mean()), rel=1e-5)
    assert float(stats["0"].std[1]) == pytest.approx(float(direct.std()), rel=1e-5)


@pytest.mark.parametrize("path", ["host", "device"])
def test_fused_works_on_a_model_without_relu_modules(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """A model without ReLU modules has its first batch watched by a dispatch mode (for
    ``F.relu`` calls), under which dynamo compiles nothing: that batch takes the separate
    passes, the next ones the compiled one, with no warning."""
    import warnings

    from pytest_modelhooks.stats.reduce import compiled_call, fused_raw

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled_call("probe", fused_raw, torch.randn(8), 0.05, True, True, True, True)
    if any("could not build the fused kernel" in str(warning.message) for warning in caught):
        pytest.skip("torch.compile cannot build kernels on this machine")
    if path == "device":
        monkeypatch.setattr(activations, "on_host", lambda x: False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 3))
    batches = [torch.randn(5, 6) for _ in range(3)]
    separate = record(model, batches, max_held=0)
    calls: list[int] = []
    real = reduce.compiled_call

    def counted(*args: Any) -> Any:
        calls.append(len(calls))
        return real(*args)

    monkeypatch.setattr(activations, "compiled_call", counted)
    monkeypatch.setattr(held_module, "compiled_call", counted)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = record(model, batches, fused=True)
    assert [str(warning.message) for warning in caught if "fused" in str(warning.message)] == []
    assert fused.fused and calls  # compiled passes ran, after the first batch
    assert_same(separate, fused)


def test_fused_under_a_users_dispatch_mode_compiles_after_it() -> None:
    """A forward recorded under the user's own dispatch mode (a ``FlopCounterMode``, say) runs
    the fused function as it is; the compile waits for a forward outside it."""
    import warnings

    from pytest_modelhooks.stats.reduce import compiled_call, fused_raw

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled_call("probe", fused_raw, torch.randn(8), 0.05, True, True, True, True)
    if any("could not build the fused kernel" in str(warning.message) for warning in caught):
        pytest.skip("torch.compile cannot build kernels on this machine")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    batches = [torch.randn(5, 6) for _ in range(3)]
    separate = record(model, batches, max_held=0)
    with (
        warnings.catch_warnings(record=True) as caught,
        ActivationStats(model, modules="all", fused=True) as fused,
    ):
        warnings.simplefilter("always")
        with Kernels() as seen:
            model(batches[0])
        for batch in batches[1:]:
            model(batch)
    assert seen.count > 0
    assert [str(warning.message) for warning in caught if "fused" in str(warning.message)] == []
    assert fused.fused
    assert_same(separate, fused)
