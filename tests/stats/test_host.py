"""The CPU's host reductions: a large tensor reduced piece by piece gives the numbers of whole
passes (and of a float64 computation), whatever its layout, dtype and special values."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from pytest_modelhooks import ActivationStats, GradientStats
from pytest_modelhooks.stats import host
from pytest_modelhooks.stats.records import STATISTICS

ALL = frozenset(STATISTICS)


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    # pieces of 1,000 elements: every layout below takes several, and a last short one
    monkeypatch.setattr(host, "_piece_size", lambda: 1000)
    monkeypatch.setattr(host, "_MAX_RUN", 8000)


def _truth(x: torch.Tensor, eps: float, axis: int | None) -> tuple[list[float], torch.Tensor | None]:
    as64 = x.double()
    finite = bool(torch.isfinite(as64).all())
    row = [
        float(as64.mean()) if finite else math.nan,
        float(as64.std()) if finite else math.nan,
        float((as64.abs() <= float(torch.tensor(eps, dtype=torch.float32))).double().mean()),
        float((~torch.isfinite(as64)).sum()),
        float(as64.min()),
        float(as64.max()),
    ]
    maxima = None if axis is None else x.amax(dim=[dim for dim in range(x.dim()) if dim != axis])
    return row, maxima


def _assert_row(row: list[float], expected: list[float]) -> None:
    for name, got, want in zip(STATISTICS, row, expected, strict=True):
        if math.isnan(want):
            assert math.isnan(got), name
        elif name in ("mean", "std"):
            assert got == pytest.approx(want, rel=1e-6, abs=1e-12), name
        else:
            assert got == want, name  # counts and extremes: exact


LAYOUTS = [
    ((3, 4, 20, 20), 1),  # planes of 400 (conv maps)
    ((4, 6, 7, 7), 1),  # short runs of 49: rows folded first (a late CNN stage)
    ((5, 33, 24), 2),  # channels last (a sequence model)
    ((4, 3, 10, 33), 2),  # an axis in the middle, short runs
    ((7, 1001), None),  # no channels: pieces of 1,000 and a short last one
    ((2, 3, 3000), 1),  # a run longer than a piece: one run a piece
]


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_pieces_give_the_numbers_of_whole_passes(
    shape: tuple[int, ...], axis: int | None, dtype: torch.dtype
) -> None:
    torch.manual_seed(len(shape) * 100 + shape[-1])
    x = (torch.randn(shape) * 2 + 0.3).to(dtype)
    x.view(-1)[::7] = 0.0
    before = x.clone()
    row, maxima = host.host_row(x, 0.05, ALL, axis)
    assert torch.equal(x, before)  # only scratch buffers are written
    expected, expected_maxima = _truth(x, 0.05, axis)
    _assert_row(row, expected)
    whole = host.reduce_on_host(x, 0.05, ALL, expected_maxima)
    _assert_row(row, whole)
    if axis is None:
        assert maxima is None
    else:
        assert maxima is not None and expected_maxima is not None
        assert maxima.dtype == x.dtype
        torch.testing.assert_close(maxima, expected_maxima, rtol=0, atol=0)


@pytest.mark.usefixtures("small_pieces")
def test_a_run_longer_than_the_cache_takes_whole_passes() -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 9000) + 0.5  # planes of 9,000: over the 8,000 a run may hold here
    assert host._pieces(x, 0.05, ALL, 1) is None
    assert host._pieces(x, 0.05, ALL, None) is not None  # without channels it is cut anywhere
    row, maxima = host.host_row(x, 0.05, ALL, 1)
    expected, expected_maxima = _truth(x, 0.05, 1)
    _assert_row(row, expected)
    assert maxima is not None and torch.equal(maxima, expected_maxima)


def test_a_piece_grows_with_torchs_threads_up_to_an_exact_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert host._piece_size() == 4 * host._PIECE  # each thread's share stays in its core's cache
    monkeypatch.setattr(torch, "get_num_threads", lambda: 10_000)
    # a piece's count near zero is summed in float32: exact only below 2**24
    assert host._piece_size() + host._MAX_RUN < 2**24


@pytest.mark.usefixtures("small_pieces")
def test_pieces_of_a_transposed_tensor_follow_its_logical_order() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 20, 30).transpose(1, 2)  # (6, 30, 20), not contiguous
    row, maxima = host.host_row(x, 0.05, ALL, 1)
    expected, expected_maxima = _truth(x, 0.05, 1)
    _assert_row(row, expected)
    assert maxima is not None and torch.equal(maxima, expected_maxima)


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize("eps", [0.05, 0.0, 1e-30])
def test_pieces_count_the_boundary_signed_zeros_and_no_nan(eps: float) -> None:
    # near zero compares the squares the sum of squares wrote, where that is exact for eps;
    # where it is not (eps 0, an eps whose square is subnormal) |x| is compared instead
    torch.manual_seed(1)
    x = torch.randn(9000) * 0.1
    edge = torch.tensor(eps, dtype=torch.float32)
    above = torch.nextafter(edge, torch.tensor(1.0))
    x[::3] = -0.0
    x[1::5] = edge
    x[2::7] = -edge
    x[3::11] = above
    x[4::13] = -above
    x[5::17] = math.nan
    x[6::19] = -math.inf
    x[:1000] = x[:1000].abs()  # a piece with nothing below zero
    near_zero, nonfinite, low = (host.host_row(x, eps, ALL, None)[0][slot] for slot in (2, 3, 4))
    expected = (x.double().abs() <= edge.double()).double().mean()
    assert near_zero == float(expected)
    assert nonfinite == float((~torch.isfinite(x)).sum())
    assert math.isnan(low)  # a piece held NaN: so does the minimum, as amin gives


def test_the_square_threshold_is_exact_or_absent() -> None:
    for eps in (0.05, 1.0, 3e-3, 1e-12):
        for dtype in (torch.float32, torch.float64):
            threshold = host._square_threshold(eps, dtype)
            assert threshold is not None
            edge = torch.tensor(eps, dtype=dtype)
            values = torch.stack([edge, torch.nextafter(edge, torch.tensor(math.inf, dtype=dtype))])
            values = torch.cat([values, -values, torch.nextafter(values, torch.zeros((), dtype=dtype))])
            squared = (values * values) <= threshold
            torch.testing.assert_close(squared, values.abs() <= edge)
    assert host._square_threshold(0.0, torch.float32) is None
    assert host._square_threshold(1e-30, torch.float32) is None  # its square is below float32's range


@pytest.mark.usefixtures("small_pieces")
def test_pieces_with_overflowing_squares_and_non_finite_values() -> None:
    x = torch.full((5000,), 3e30)  # finite, but its squares overflow float32
    x[::2] = -1e30
    row = host.host_row(x, 0.05, ALL, None)[0]
    _assert_row(row, _truth(x, 0.05, None)[0])
    x[17] = math.inf
    x[4000] = -math.inf
    row = host.host_row(x, 0.05, ALL, None)[0]
    assert math.isnan(row[0]) and math.isnan(row[1]) and row[3] == 2.0
    assert (row[4], row[5]) == (-math.inf, math.inf)


@pytest.mark.usefixtures("small_pieces")
def test_pieces_compute_only_what_is_wanted() -> None:
    torch.manual_seed(2)
    x = torch.randn(4, 3, 40, 40)
    for wanted in ({"mean", "std"}, {"near_zero"}, {"min", "max"}, {"nonfinite"}):
        row, _ = host.host_row(x, 0.05, frozenset(wanted), 1)
        expected = _truth(x, 0.05, 1)[0]
        for name, got, want in zip(STATISTICS, row, expected, strict=True):
            if name in wanted:
                assert got == pytest.approx(want, rel=1e-6), (wanted, name)
            else:
                assert math.isnan(got), (wanted, name)


def test_a_large_tensor_takes_pieces_and_stays_accurate() -> None:
    # a mean 40 stds away stresses the one-pass variance; bfloat16-valued floats stress a
    # float32 accumulation (a BLAS dot drifts 4e-6 here)
    torch.manual_seed(3)
    x = (torch.randn(8, 64, 60, 60) * 0.5 + 20).bfloat16().float()
    row, maxima = host.host_row(x, 0.05, ALL, 1)
    expected, expected_maxima = _truth(x, 0.05, 1)
    assert row[0] == pytest.approx(expected[0], rel=1e-7)
    assert row[1] == pytest.approx(expected[1], rel=1e-6)
    assert row[2:] == expected[2:]
    assert maxima is not None and torch.equal(maxima, expected_maxima)


@pytest.mark.usefixtures("small_pieces")
def test_gradients_in_pieces() -> None:
    torch.manual_seed(4)
    grad = torch.randn(3, 3001) * 0.01 - 0.002
    norm, mean, std, max_abs, nonfinite = host.grad_on_host(grad)
    as64 = grad.double()
    assert norm == pytest.approx(float(torch.linalg.vector_norm(as64)), rel=1e-7)
    assert mean == pytest.approx(float(as64.mean()), rel=1e-6)
    assert std == pytest.approx(float(as64.std()), rel=1e-7)
    assert (max_abs, nonfinite) == (float(grad.abs().max()), 0.0)
    grad[1, 5] = -math.inf
    norm, mean, _, _, nonfinite = host.grad_on_host(grad)
    assert norm == math.inf and math.isnan(mean) and nonfinite == 1.0


@pytest.mark.usefixtures("small_pieces")
def test_recorders_in_pieces_match_a_direct_computation() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    model[0].bias.data[:2] = -50.0  # two channels never above zero after the ReLU: dead
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        return lambda module, args, out: seen.__setitem__(name, out.detach().clone())

    handles = [module.register_forward_hook(keep(name)) for name, module in model.named_children()]
    batch = torch.randn(4, 3, 30, 30)
    with ActivationStats(model, modules="all") as stats, GradientStats(model) as grads:
        model.eval()
        model(batch).sum().backward()
    for handle in handles:
        handle.remove()
    for name, out in seen.items():
        layer = stats[name]
        expected, _ = _truth(out, 0.05, 1)
        for statistic, want in zip(STATISTICS, expected, strict=True):
            assert float(layer[statistic][0]) == pytest.approx(want, rel=1e-6, abs=1e-12), (name, statistic)
    assert stats["2"].dead == pytest.approx(2 / 8)
    weight = model[0].weight.grad
    assert weight is not None
    assert float(grads["0.weight"].norm[0]) == pytest.approx(float(weight.double().norm()), rel=1e-6)


@pytest.mark.usefixtures("small_pieces")
def test_pieces_under_inference_mode_and_outside_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # the pieces' buffers are reused across calls, and the channel maxima they give are kept
    # across batches: a batch under inference_mode must not poison the next one outside it
    import threading

    monkeypatch.setattr(host, "_scratch", threading.local())
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    with torch.no_grad():
        net[0].bias[0] = -100.0  # one channel never above zero: a dead unit
    batches = [torch.randn(2, 3, 20, 20) for _ in range(4)]
    with ActivationStats(net) as stats:
        for index, batch in enumerate(batches):
            if index % 2 == 0:
                with torch.inference_mode():
                    net(batch)
            else:
                net(batch)
    assert stats.num_batches == 4
    with torch.no_grad():
        outputs = [net[0](batch) for batch in batches]
    for index, out in enumerate(outputs):
        expected, _ = _truth(out, 0.05, None)
        assert float(stats["0"].mean[index]) == pytest.approx(expected[0], rel=1e-6)
        assert float(stats["0"].near_zero[index]) == expected[2]
        assert float(stats["0"].min[index]) == expected[4]
    # the running channel maxima crossed the inference_mode boundary: dead units as one max
    maxima = torch.stack([out.amax(dim=(0, 2, 3)) for out in outputs]).amax(0)
    assert float((maxima <= 0).double().mean()) == 0.25
    assert stats["0"].dead == pytest.approx(0.25)
