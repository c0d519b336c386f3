from __future__ import annotations

import gc
import json
import math
import threading
import warnings
import weakref
from typing import Any

import pytest
import torch
from torch import nn

from pytest_modelhooks import ActivationStats, GradientStats, HealthError, count_hooks, model_summary
from pytest_modelhooks.stats import STATISTICS, activations, gradients, host, reduce
from pytest_modelhooks.stats.host import grad_on_host, reduce_on_host
from pytest_modelhooks.stats.reduce import _stack_raw, finish_device, reduce_on_device
from tests import zoo
from tests.helpers import untouched


def reference(x: torch.Tensor, eps: float = 0.05) -> dict[str, float]:
    as64 = x.detach().double()
    return {
        "mean": float(as64.mean()),
        "std": float(as64.std()),
        "near_zero": float((as64.abs() <= eps).double().mean()),
        "min": float(as64.min()),
        "max": float(as64.max()),
    }


def capture(model: nn.Module, names: list[str]) -> tuple[dict[str, list[torch.Tensor]], list[Any]]:
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(
            lambda m, a, out, name=name: seen[name].append(out.detach().clone())
        )
        for name in names
    ]
    return seen, handles


def test_statistics_match_a_direct_float64_computation() -> None:
    model, _ = zoo.build("mlp")
    model.train()
    stats = ActivationStats(model, modules="all")
    seen, handles = capture(model, ["0", "1", "3", "5"])
    with stats:
        for _ in range(4):
            model(torch.randn(16, 20) * 3 + 1)
    for handle in handles:
        handle.remove()
    assert stats.num_batches == 4
    for name, outputs in seen.items():
        layer = stats[name]
        for batch, out in enumerate(outputs):
            expected = reference(out)
            for statistic, value in expected.items():
                assert float(layer[statistic][batch]) == pytest.approx(value, rel=1e-5, abs=1e-7), (
                    name,
                    statistic,
                )
            assert float(layer.nonfinite[batch]) == 0


@pytest.mark.parametrize(
    ("offset", "scale"),
    [(100.0, 0.01), (-3e4, 1.0), (0.0, 1e-20), (1e-20, 1e-22), (0.0, 1e18), (5.0, 0.0)],
)
def test_statistics_are_numerically_stable(offset: float, scale: float) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 257, dtype=torch.float64) * scale + offset
    x32 = x.float()
    mean, std, near_zero, nonfinite, low, high = reduce_on_host(x32, 0.05)
    truth = x32.double()
    assert mean == pytest.approx(float(truth.mean()), rel=1e-5, abs=1e-30)
    assert std == pytest.approx(float(truth.std()), rel=1e-5, abs=1e-30)
    assert (low, high, nonfinite) == (float(truth.min()), float(truth.max()), 0.0)
    assert near_zero == pytest.approx(float((truth.abs() <= 0.05).double().mean()))


def test_statistics_of_a_large_activation_stay_accurate() -> None:
    # 26M values: torch's whole-tensor float32 vector_norm drifts by ~2e-3 here, var_mean is slow
    torch.manual_seed(0)
    x = torch.randn(26_000_003) * 2 + 0.5
    truth = x.double()
    mean, std, near_zero, *_ = reduce_on_host(x, 0.05)
    assert mean == pytest.approx(float(truth.mean()), rel=1e-6)
    assert std == pytest.approx(float(truth.std()), rel=1e-6)
    assert near_zero == float((x.abs() <= 0.05).sum()) / x.numel()
    norm = grad_on_host(x)[0]
    assert norm == pytest.approx(float(torch.linalg.vector_norm(truth)), rel=1e-6)


@pytest.mark.parametrize("size", [7, 4096, 4097, 4096 * 3 + 5, 2 * 2**18 + 5])  # both sides of the small path
@pytest.mark.parametrize("eps", [0.05, 0.0])
def test_near_zero_counts_signed_zeros_and_the_boundary_but_not_nan(size: int, eps: float) -> None:
    torch.manual_seed(size)
    x = torch.randn(size) * 0.1
    x[::3] = -0.0
    x[1::5] = eps
    x[2::7] = -eps
    x[3::11] = math.nan
    x[4::13] = -math.inf
    x[5::17] = torch.nextafter(torch.tensor(eps), torch.tensor(1.0))  # just above: not near zero
    x[6::19] = -x[5]
    near_zero, nonfinite = (reduce_on_host(x, eps)[slot] for slot in (2, 3))
    expected = x.double().abs() <= torch.tensor(eps, dtype=torch.float32).double()
    assert near_zero == pytest.approx(float(expected.double().mean()), abs=1e-12)
    assert nonfinite == float((~torch.isfinite(x)).sum())


def test_recording_under_inference_mode_and_outside_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # the CPU path reuses a scratch buffer per thread: one made under inference_mode must still
    # serve a normal forward, and the other way round
    monkeypatch.setattr(host, "_scratch", threading.local())
    net = nn.Sequential(nn.Linear(4, 3000), nn.ReLU())
    batches = [torch.randn(2, 4) for _ in range(3)]
    with ActivationStats(net) as stats:
        with torch.inference_mode():
            net(batches[0])
        net(batches[1])
        with torch.inference_mode():
            net(batches[2])
    assert stats.num_batches == 3
    with torch.no_grad():
        expected = [float((net[0](batch).abs() <= 0.05).double().mean()) for batch in batches]
    assert stats["0"].near_zero.tolist() == pytest.approx(expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_half_precision_is_reduced_in_float32(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = (torch.randn(32, 300) * 2 + 0.5).to(dtype)
    truth = reference(x)
    mean, std, near_zero, _, low, high = reduce_on_host(x, 0.05)
    assert mean == pytest.approx(truth["mean"], rel=1e-5)
    assert std == pytest.approx(truth["std"], rel=1e-5)
    assert (low, high) == (truth["min"], truth["max"])
    assert near_zero == pytest.approx(truth["near_zero"])


def test_device_reduction_agrees_with_the_host_one() -> None:
    # the accelerator path runs on any device; here it is checked against the CPU path
    torch.manual_seed(0)
    for x in [
        torch.randn(8, 33),
        torch.randn(4, 5, 6) * 7 - 2,
        torch.tensor([1.0, float("nan"), float("inf")]),
    ]:
        host = torch.tensor(reduce_on_host(x, 0.05), dtype=torch.float64)
        raw = _stack_raw([reduce_on_device(x, 0.05)])
        assert raw.shape == (1, 6) and raw.device == x.device
        device = finish_device(raw, torch.tensor([float(x.numel())]))[0]
        if torch.isfinite(host[:2]).all():
            torch.testing.assert_close(device, host, rtol=1e-5, atol=1e-6)
        else:
            assert float(device[3]) == float(host[3]) == 2.0


def test_fastai_layout_and_modules_that_never_ran() -> None:
    model, batch = zoo.build("data_dependent")
    with ActivationStats(model) as stats:
        model(batch)
        model(batch)
    assert stats.stats.shape == (2, 3, 2)  # modules owning parameters: first, pos, neg
    assert stats.stats.dtype == torch.float32
    assert torch.isnan(stats.stats[:, 2]).all()  # "neg" never ran
    assert not torch.isnan(stats.stats[:, :2]).any()


def test_every_and_train_only() -> None:
    model = zoo.mlp()
    with ActivationStats(model, every=2) as every:
        for _ in range(6):
            model(torch.randn(4, 20))
    assert every.num_batches == 3 and every["0"].batches.tolist() == [0, 2, 4]
    with ActivationStats(model, train_only=True) as train:
        model.train()(torch.randn(4, 20))
        model.eval()(torch.randn(4, 20))
        model.train()(torch.randn(4, 20))
    assert train["0"].batches.tolist() == [0, 2]


def test_tuple_and_dict_outputs_give_one_named_series_per_tensor() -> None:
    model, batch = zoo.build("lstm_tagger")
    with ActivationStats(model, modules="all") as stats:
        model(batch)
    assert stats.series_names == ["embed", "lstm[0]", "lstm[1][0]", "lstm[1][1]", "tag", ""]
    assert stats["lstm[1][0]"].type == "LSTM"
    dict_model, batch = zoo.build("dict_out")
    with ActivationStats(dict_model, modules="all") as stats:
        dict_model(batch)
    assert stats.series_names == ["body", "head", "logits", "hidden"]


def test_a_model_output_named_like_one_of_its_layers_gets_a_series_of_its_own_name() -> None:
    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.aux = nn.Identity()  # no parameters: not hooked, its name is still taken

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"head": self.head(x) * 2, "aux": self.aux(x), "other": x}

    model = Heads()
    with ActivationStats(model, modules=["", "head"]) as stats:
        model(torch.randn(3, 4))
    assert stats.series_names == ["head", "(model).head", "(model).aux", "other"]
    assert stats["head"].type == "Linear" and stats["(model).head"].type == "Heads"
    assert stats["(model).head"].mean.item() == pytest.approx(2 * stats["head"].mean.item())


class _Spectral(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft(x)


def test_complex_outputs_are_reduced_over_their_real_and_imaginary_parts() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), _Spectral())
    batch = torch.randn(4, 8)
    with ActivationStats(model, modules="all", with_hist=True) as stats:
        spectrum = model(batch)
    assert spectrum.is_complex() and stats.series_names == ["0", "1", ""]
    parts = torch.view_as_real(spectrum).detach().double()
    record = stats["1"]
    assert float(record.mean[0]) == pytest.approx(float(parts.mean()), rel=1e-5, abs=1e-7)
    assert float(record.std[0]) == pytest.approx(float(parts.std()), rel=1e-5)
    assert float(record.max[0]) == pytest.approx(float(parts.max()), rel=1e-6)
    assert float(record.nonfinite[0]) == 0 and record.dead is None  # no dead units
    assert record.hist is not None and float(record.hist.sum()) == parts.numel()
    stats.check(max_dead=0.0)  # nothing to judge there, and nothing fails


def test_complex_parameters_get_gradient_statistics() -> None:
    layer = nn.Linear(4, 3, dtype=torch.complex64)
    with warnings.catch_warnings(), GradientStats(layer) as grads:
        warnings.simplefilter("error")  # no "casting complex values to real discards..."
        layer(torch.randn(2, 4, dtype=torch.complex64)).abs().sum().backward()
    assert grads.unused() == []
    grad = layer.weight.grad
    assert grad is not None
    assert float(grads["weight"].norm[0]) == pytest.approx(float(torch.linalg.vector_norm(grad)), rel=1e-5)
    assert float(grads["weight"].max_abs[0]) == float(torch.view_as_real(grad).abs().max())


def test_complex_gradient_counts_are_right_on_the_device_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # the device (and fused) rows count finite real numbers, two per complex element: the
    # parameter's size must be counted the same way (a CUDA step reported -12 non-finite)
    monkeypatch.setattr(gradients, "grad_on_host", lambda grad: reduce.grad_on_device(grad))
    layer = nn.Linear(4, 3, dtype=torch.complex64)
    with GradientStats(layer) as grads:
        layer(torch.randn(2, 4, dtype=torch.complex64)).abs().sum().backward()
        out = layer(torch.randn(2, 4, dtype=torch.complex64))

        def poison(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            grad[0, 1] = complex(math.nan, 0.0)  # one real number of output 1's gradient
            return grad

        out.register_hook(poison)
        out.abs().sum().backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None
        expected = int((~torch.isfinite(torch.view_as_real(param.grad))).sum())
        assert expected > 0 and grads[name].nonfinite.tolist() == [0.0, expected], name


class _SparseTables(nn.Module):
    """A recommender-style model: its tables are too big for dense gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.users = nn.Embedding(50, 4, sparse=True)
        self.items = nn.EmbeddingBag(30, 4, mode="sum", sparse=True)
        self.head = nn.Linear(8, 1)

    def forward(self, users: torch.Tensor, items: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.users(users), self.items(items, offsets)], dim=1))


def test_sparse_gradients_are_measured_as_their_dense_equals() -> None:
    # nn.Embedding(sparse=True) writes sparse COO gradients ("reshape is not implemented for
    # sparse tensors" before); the rows it does not touch are zeros of the gradient
    torch.manual_seed(0)
    model = _SparseTables()
    users = torch.tensor([3, 7, 3, 3])  # a row looked up three times: its parts add up
    items, offsets = torch.tensor([1, 2, 2, 9, 4, 1]), torch.tensor([0, 2, 3, 5])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    expected: list[dict[str, list[float]]] = []
    with GradientStats(model) as grads:
        for _ in range(2):
            optimizer.zero_grad()
            model(users, items, offsets).square().sum().backward()
            assert model.users.weight.grad is not None and model.users.weight.grad.is_sparse
            dense = {name: p.grad.to_dense().double() for name, p in model.named_parameters()}
            expected.append(
                {
                    name: [
                        float(g.norm()),
                        float(g.mean()),
                        float(g.std()) if g.numel() > 1 else 0.0,
                        float(g.abs().max()),
                    ]
                    for name, g in dense.items()
                }
            )
            optimizer.step()
    for step, values in enumerate(expected):
        for name, (norm, mean, std, max_abs) in values.items():
            stats = grads[name]
            assert float(stats.norm[step]) == pytest.approx(norm, rel=1e-5), name
            assert float(stats.mean[step]) == pytest.approx(mean, rel=1e-5, abs=1e-9), name
            assert float(stats.std[step]) == pytest.approx(std, rel=1e-5), name
            assert float(stats.max_abs[step]) == pytest.approx(max_abs, rel=1e-6), name
            assert float(stats.nonfinite[step]) == 0.0
    grads.check(require_update=True)  # every table got a gradient and was updated


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta:UserWarning")
@pytest.mark.parametrize(
    "case", ["coo with repeats", "csr", "complex", "non-finite", "nothing stored", "one element"]
)
def test_sparse_gradient_rows_equal_the_dense_ones(case: str) -> None:
    from pytest_modelhooks.stats.reduce import finish_grads as _finish_grads
    from pytest_modelhooks.stats.reduce import sparse_grad_raw as _sparse_grad_raw

    torch.manual_seed(0)
    dense = torch.zeros(6, 5)
    dense[1], dense[4, 2] = torch.randn(5), 3.0
    if case == "coo with repeats":
        indices, values = torch.tensor([[1, 4, 1], [0, 2, 0]]), torch.tensor([0.5, 3.0, -2.0])
        sparse = torch.sparse_coo_tensor(indices, values, (6, 5), check_invariants=True)
        dense = sparse.to_dense()
    elif case == "csr":
        sparse = dense.to_sparse_csr()
    elif case == "complex":
        dense = torch.complex(dense, dense.flip(0))
        sparse = dense.to_sparse()
    elif case == "non-finite":
        dense[4, 2] = math.inf
        sparse = dense.to_sparse()
    elif case == "nothing stored":
        dense = torch.zeros(6, 5)
        sparse = dense.to_sparse()
    else:
        dense = torch.tensor([2.0])
        sparse = dense.to_sparse()
    real = torch.view_as_real(dense) if dense.is_complex() else dense
    row = _finish_grads(_sparse_grad_raw(sparse).reshape(1, -1), [real.numel()])[0]
    host = torch.tensor(grad_on_host(real), dtype=torch.float64)
    if case == "non-finite":  # the count and the norm; the host leaves mean and std NaN
        assert float(row[4]) == float(host[4]) == 1.0 and math.isinf(float(row[0]))
        return
    torch.testing.assert_close(row, host, rtol=1e-6, atol=1e-9)


def _conv_net_with_dead_channels() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(0), nn.Linear(6 * 36, 4))
    with torch.no_grad():
        model[0].bias[:2] = -100.0  # two of six channels can never fire
    return model


@pytest.mark.parametrize("in_dims", [0, 1])
def test_statistics_under_vmap_cover_the_whole_batch(in_dims: int) -> None:
    # torch.func.vmap (per-sample gradients, ensembles) hands hooks one sample's view, which
    # cannot be read (.item() under vmap raised); the statistics are the whole batch's
    from torch.func import vmap

    model = _conv_net_with_dead_channels()
    batch = torch.randn(5, 3, 8, 8)
    with ActivationStats(model) as single:
        model(batch[0])  # one unbatched sample, as vmap hands the model
    assert single["0"].dead == pytest.approx(2 / 6)  # (C, H, W): channels are the first dim
    with ActivationStats(model, with_hist=True) as under_vmap:
        out = vmap(model, in_dims=in_dims)(batch.movedim(0, in_dims))
    assert out.shape == (5, 4)
    assert under_vmap.num_batches == 1 and under_vmap["0"].dead == pytest.approx(2 / 6)
    direct = model[0](batch).detach().double()
    assert float(under_vmap["0"].mean[0]) == pytest.approx(float(direct.mean()), rel=1e-5)
    assert float(under_vmap["0"].std[0]) == pytest.approx(float(direct.std()), rel=1e-5)
    assert float(under_vmap["3"].hist.sum()) == 5 * 4  # every sample's logits


def test_per_sample_gradients_with_torch_func_run_under_activation_stats() -> None:
    from torch.func import functional_call, grad, vmap

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    params = {name: param.detach() for name, param in model.named_parameters()}

    def loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0))

    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    with untouched(model), ActivationStats(model) as stats:
        per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    assert per_sample["0.weight"].shape == (6, 8, 4)
    assert float(stats["0"].mean[0]) == pytest.approx(float(model[0](x).detach().mean()), rel=1e-5)


def test_recorded_batches_are_packed_for_long_runs() -> None:
    # a training loop may record 100,000s of batches: per batch one float64 tensor of rows and
    # a shared tuple of series ids, not lists of Python floats (~4x the memory)
    model = zoo.mlp()
    with ActivationStats(model) as stats:
        for _ in range(3):
            model(torch.randn(4, 20))
    (_, first), *_, (_, last) = stats._batches
    assert first[0][0] is last[0][0] and isinstance(first[0][0], tuple)
    rows = first[0][1]
    assert isinstance(rows, torch.Tensor) and rows.dtype == torch.float64
    assert rows.shape == (len(stats.series_names), len(STATISTICS))


def test_gradient_steps_are_packed_for_long_runs() -> None:
    model = zoo.mlp()
    with GradientStats(model) as grads:
        for _ in range(3):
            model(torch.randn(4, 20)).sum().backward()
    (first_order, first_rows, raw), *_, (last_order, _, _) = grads._steps
    assert first_order is last_order and not raw  # one shared order; host rows finished
    assert isinstance(first_rows, torch.Tensor) and first_rows.shape == (len(grads), 5)


def test_a_step_mixing_host_and_device_rows_is_finished_row_by_row() -> None:
    # (a model across devices, or a fused pass that fell back mid-step)
    from pytest_modelhooks.stats.reduce import grad_on_device as _grad_on_device
    from pytest_modelhooks.stats.reduce import pack_grad_rows as _pack_grad_rows

    torch.manual_seed(0)
    first, second = torch.randn(6, 3), torch.randn(50)
    rows, raw = _pack_grad_rows({1: grad_on_host(second), 0: _grad_on_device(first)}, [18, 50])
    assert not raw
    expected = torch.tensor([grad_on_host(second), grad_on_host(first)], dtype=torch.float64)
    torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-7)


def test_a_model_on_meta_is_not_measured_and_the_check_says_why() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    with ActivationStats(model) as stats, GradientStats(model) as grads:
        model(torch.randn(2, 4, device="meta")).sum().backward()
    with pytest.raises(HealthError, match=r"ran on the meta device, whose tensors have shapes but no values"):
        stats.check()
    assert stats.num_batches == 0 and stats.stats.shape == (2, 2, 0)  # two hooked Linears
    with pytest.raises(HealthError, match=r"the gradients were on the meta device"):
        grads.check()


def relu_net_with_dead_units() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].bias[:4] = -100.0  # four units can never fire
    return model


def test_dead_units_are_counted_per_channel() -> None:
    model = relu_net_with_dead_units()
    with ActivationStats(model, modules="all") as stats:
        for _ in range(3):
            model(torch.randn(32, 8))
    assert stats["0"].dead == pytest.approx(4 / 16) and stats["0"].channels == 16
    assert stats["1"].dead == pytest.approx(4 / 16)
    findings = [f for f in stats.findings(max_dead=0.2) if f.layer in ("0", "1")]
    assert [(f.layer, f.statistic, f.note) for f in findings] == [
        ("0", "dead", "4 of 16 channels never active"),
        ("1", "dead", "4 of 16 channels never active"),
    ]


def test_dead_units_use_the_channel_dimension_of_convs_and_the_feature_dimension_of_sequences() -> None:
    conv = nn.Conv1d(3, 6, 3)
    with torch.no_grad():
        conv.bias[:2] = -100.0
    seq = nn.Sequential(conv)
    with ActivationStats(seq) as stats:
        seq(torch.randn(4, 3, 20))
    assert stats["0"].dead == pytest.approx(2 / 6)
    linear = nn.Linear(5, 10)
    with torch.no_grad():
        linear.bias[:5] = -100.0
    tokens = nn.Sequential(linear)
    with ActivationStats(tokens) as stats:
        tokens(torch.randn(2, 7, 5))  # (B, L, F): features last
    assert stats["0"].dead == pytest.approx(0.5) and stats["0"].channels == 10


def scaled_stack(factor_at: int, factor: float) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for index in range(6):
        linear = nn.Linear(64, 64)
        nn.init.orthogonal_(linear.weight)
        nn.init.zeros_(linear.bias)
        if index == factor_at:
            with torch.no_grad():
                linear.weight *= factor
        layers += [linear, nn.Tanh()] if index < 5 else [linear]
    return nn.Sequential(*layers)


def test_exploding_layer_is_named() -> None:
    model = scaled_stack(factor_at=3, factor=30.0)
    with ActivationStats(model) as stats:
        for _ in range(2):
            model(torch.randn(32, 64))
    growth = [f for f in stats.findings(max_std_growth=5.0)]
    assert [(f.layer, f.statistic, f.note) for f in growth] == [("6", "std growth", "vs 4")]
    assert growth[0].observed > 5
    with pytest.raises(
        HealthError,
        match=r"(?s)activation health check failed.*\b6\s+Linear\s+std\s+\S+\s+<= 5\s+\d+\s+exploding",
    ):
        stats.check(std=(0.01, 5.0))


def test_vanishing_layer_is_named() -> None:
    model = scaled_stack(factor_at=2, factor=1e-4)
    with ActivationStats(model) as stats:
        model(torch.randn(32, 64))
    vanishing = [f for f in stats.findings(std=(1e-2, 10.0)) if f.note == "vanishing"]
    assert vanishing[0].layer == "4" and vanishing[0].batch == 0


class InjectNaN(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[0, 0] = float("nan")
        return x


def test_the_first_non_finite_layer_is_named_with_the_one_before() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), InjectNaN(), nn.Linear(8, 8), nn.Linear(8, 2)
    )
    with ActivationStats(model, modules="all") as stats:
        model(torch.randn(3, 4))  # batch 0 is healthy...
        model[3].register_forward_hook(lambda m, a, out: None)  # (unrelated hooks do not matter)
        model(torch.randn(3, 4))
    findings = stats.findings()
    assert len(findings) == 1
    first = findings[0]
    assert (first.layer, first.layer_type, first.statistic, first.batch) == ("3", "InjectNaN", "nonfinite", 0)
    assert "previous layer 2 was finite" in first.note
    with pytest.raises(
        AssertionError, match=r"3\s+InjectNaN\s+nonfinite\s+1\s+0\s+0\s+first non-finite layer"
    ):
        stats.check()
    stats.check(allow_nonfinite=True)
    model[3]._forward_hooks.clear()


def test_a_standard_model_passes_the_checks() -> None:
    cnn, batch = zoo.build("resnetish")
    transformer, tokens = zoo.build("transformer")
    for model, data in [(cnn, batch), (transformer, tokens)]:
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        with ActivationStats(model) as stats, GradientStats(model) as grads:
            for _ in range(3):
                model(data).pow(2).mean().backward()
                optimizer.step()
                optimizer.zero_grad()
        stats.check(std=(0.05, 5.0), max_std_growth=10.0, max_near_zero=0.5, max_dead=0.5)
        grads.check(max_norm=100.0, min_norm=1e-8)


def test_hooks_are_removed_and_the_model_is_unchanged_after_an_exception() -> None:
    model, batch = zoo.build("mixed_modes")
    with (
        untouched(model, values=False),
        pytest.raises(RuntimeError, match="mid-training"),
        ActivationStats(model, modules="all", with_hist=True) as stats,
        GradientStats(model),
    ):
        model(batch).sum().backward()
        raise RuntimeError("mid-training")
    assert count_hooks(model) == 0 and stats.num_batches == 1


def test_activations_are_never_kept() -> None:
    model = zoo.mlp()
    refs: list[weakref.ref[torch.Tensor]] = []
    handle = model[0].register_forward_hook(lambda m, a, out: refs.append(weakref.ref(out)))
    with ActivationStats(model, modules="all", with_hist=True):
        out = model(torch.randn(8, 20))
    handle.remove()
    del out
    gc.collect()
    assert refs and refs[0]() is None


def test_histograms_cover_negative_values() -> None:
    model = nn.Sequential(nn.Identity())
    with ActivationStats(model, modules="all", with_hist=True, hist_bins=4, hist_range=(-2.0, 2.0)) as stats:
        model(torch.tensor([-1.5, -0.5, 0.5, 1.5, 1.6]))
    assert stats["0"].hist is not None
    assert stats["0"].hist.tolist() == [[1.0, 1.0, 1.0, 2.0]]


def test_lookup_and_json() -> None:
    model = zoo.mlp()
    with ActivationStats(model) as stats:
        model(torch.randn(2, 20))
    assert stats[0].name == "0" and stats[-1].name == "5" and len(stats) == 3
    with pytest.raises(KeyError, match=r"no statistics for 'nope'; recorded series are: 0, 3, 5"):
        stats["nope"]
    with pytest.raises(KeyError, match="unknown statistic"):
        stats[0]["median"]
    data = json.loads(json.dumps(stats.to_dict()))
    assert data["batches"] == [0] and set(data["series"]) == {"0", "3", "5"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every": 0}, r"every must be a positive int, got every=0"),
        ({"eps": -1.0}, r"eps must be >= 0, got eps=-1.0"),
        ({"with_hist": True, "hist_range": (1.0, 1.0)}, r"hist_range=\(1.0, 1.0\)"),
        ({"modules": "nothing.*"}, r"modules='nothing\.\*' matches no module of Sequential"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ActivationStats(zoo.mlp(), **kwargs)


# -- gradients --


def test_gradient_statistics_match_the_gradients() -> None:
    model, batch = zoo.build("mlp")
    norms: list[dict[str, float]] = []
    extremes: list[dict[str, tuple[float, float, bool]]] = []
    with GradientStats(model) as grads:
        for _ in range(3):
            model(batch).pow(2).sum().backward()
            norms.append({name: float(p.grad.norm()) for name, p in model.named_parameters()})
            means = {name: float(p.grad.double().mean()) for name, p in model.named_parameters()}
            extremes.append(
                {
                    name: (float(p.grad.abs().max()), float(p.grad.std()), bool(-p.grad.min() > p.grad.max()))
                    for name, p in model.named_parameters()
                }
            )
            model.zero_grad(set_to_none=True)
    assert grads.num_steps == 3
    for step, expected in enumerate(norms):
        for name, value in expected.items():
            assert float(grads[name].norm[step]) == pytest.approx(value, rel=1e-5)
            max_abs, std, _ = extremes[step][name]
            assert float(grads[name].max_abs[step]) == max_abs
            assert float(grads[name].std[step]) == pytest.approx(std, rel=1e-5)
    # max |g| is right both where the largest magnitude is negative and where it is positive
    assert {negative for step in extremes for _, _, negative in step.values()} == {True, False}
    assert float(grads["5.bias"].mean[2]) == pytest.approx(means["5.bias"], rel=1e-5, abs=1e-9)
    assert set(grads.module_norms()) == {"0", "3", "5"}


def test_the_total_norm_is_what_clip_grad_norm_sees_before_it_clips() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"net": nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), "spare": nn.Linear(2, 2)})
    returned = []
    with GradientStats(model) as grads:
        for scale in (1.0, 100.0):
            model.zero_grad()
            (model["net"](torch.randn(5, 4)) * scale).sum().backward()
            returned.append(float(nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)))
    assert grads.total_norm().tolist() == pytest.approx(returned, rel=1e-6)  # unused "spare": 0
    assert float(grads.total_norm()[1]) > 1.0  # recorded before clipping, which hid it


def test_modules_selects_the_parameters_recorded() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "backbone": nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8)),
            "head": nn.Linear(8, 2),
            "aux": nn.Linear(8, 1),  # selected, never used
        }
    )

    def step(grads_modules: Any) -> GradientStats:
        with GradientStats(model, modules=grads_modules) as grads:
            model["head"](model["backbone"](torch.randn(3, 4))).sum().backward()
        return grads

    only_head = step("head")
    assert [stats.name for stats in only_head] == ["head.weight", "head.bias"]
    assert list(only_head.to_dict()) == ["head.weight", "head.bias"] and only_head.unused() == []
    # a glob and a list, under the model's names and in its order (the backbone's submodules too)
    assert [stats.name for stats in step(["aux", "backbone"])] == [
        "backbone.0.weight",
        "backbone.0.bias",
        "backbone.2.weight",
        "backbone.2.bias",
        "aux.weight",
        "aux.bias",
    ]
    assert step("a*").unused() == ["aux.weight", "aux.bias"]
    assert len(step(nn.Linear)) == len(list(model.parameters()))
    model["head"].requires_grad_(False)
    with pytest.raises(ValueError, match=r"modules='head' selects no trainable parameter of ModuleDict"):
        GradientStats(model, modules="head")
    with pytest.raises(ValueError, match=r"modules='neck' matches no module of ModuleDict; its modules are"):
        GradientStats(model, modules="neck")
    assert count_hooks(model) == 0


def test_unused_parameters_are_named_and_frozen_ones_are_not() -> None:
    model = zoo.Reused()
    model.extra = nn.Linear(2, 2)  # never called
    model.inp.weight.requires_grad_(False)  # frozen
    with GradientStats(model) as grads:
        model(torch.randn(3, 6)).sum().backward()
    assert grads.unused() == ["extra.weight", "extra.bias"]
    assert "inp.weight" not in [stats.name for stats in grads]
    with pytest.raises(
        AssertionError,
        match=r"(?s)health check failed.*extra\s+Linear, 2 parameters\s+grad.*unused: 'extra' never ran",
    ):
        grads.check()
    grads.check(require_grad=False)


def test_exploding_vanishing_and_non_finite_gradients() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    with torch.no_grad():
        model[1].weight *= 1e6
    with GradientStats(model) as grads:
        model(torch.randn(8, 4)).sum().backward()
    exploding = grads.findings(max_norm=1e3)
    assert {f.layer for f in exploding} == {"0.weight", "0.bias"} and all(
        f.note == "exploding" for f in exploding
    )
    model.zero_grad()
    with GradientStats(model) as grads:
        (model(torch.randn(8, 4)) * float("nan")).sum().backward()
    assert {f.statistic for f in grads.findings()} == {"nonfinite grad"}
    with pytest.raises(ValueError, match=r"min_norm=2 is above max_norm=1"):
        grads.findings(max_norm=1, min_norm=2)


class _InfiniteSlope(nn.Module):
    """sqrt at zero: finite forward, infinite gradient in backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x.clamp(min=0))


def test_a_non_finite_gradient_is_traced_to_where_backward_first_produced_it() -> None:
    torch.manual_seed(0)
    layers = [nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), _InfiniteSlope(), nn.Linear(8, 8), nn.Linear(8, 1)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        model[2].weight[0] = 0.0  # unit 0 is exactly 0 before the sqrt
        model[2].bias[0] = 0.0
    with GradientStats(model) as grads:
        model(torch.randn(16, 4)).sum().backward()  # step 0: the infinite slope
        model(torch.randn(16, 4).abs() + 1).sum().backward()  # step 1 as well
    order = grads.backward_order(0)
    assert sorted(order) == sorted(name for name, _ in model.named_parameters())
    positions = [order.index(f"{layer}.weight") for layer in (5, 4, 2, 0)]
    assert positions == sorted(positions)  # nearest the loss first
    assert grads.backward_order(-1) == grads.backward_order(1)
    with pytest.raises(IndexError, match=r"step=2 is out of range: 2 step\(s\) recorded"):
        grads.backward_order(2)
    findings = grads.findings()
    assert {f.layer for f in findings} == {"0.weight", "0.bias", "2.weight", "2.bias"}
    head = findings[0]  # where non-finite values began comes first, bracketed by the finite one
    assert head.layer.startswith("2.") and head.note.startswith("first non-finite in backward at step 0; 4.")
    assert head.note.endswith("before it was finite")
    assert [f.note for f in findings[1:]] == ["", "", ""]


def test_a_non_finite_loss_is_the_first_gradient_of_its_backward() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    with GradientStats(model) as grads:
        (model(torch.randn(8, 4)) * float("nan")).sum().backward()
    head = grads.findings()[0]
    assert head.layer == grads.backward_order()[0]
    assert head.note.endswith("the first gradient of that backward")


def test_gradient_steps_end_at_the_next_forward() -> None:
    model = zoo.mlp()
    with GradientStats(model) as grads:
        for _ in range(2):
            loss = model(torch.randn(2, 20)).sum()
            loss.backward()
    assert grads.num_steps == 2
    assert not math.isnan(float(grads["0.weight"].norm[1]))
    assert count_hooks(model) == 0


def test_gradients_of_a_torchscript_model_are_recorded_per_step() -> None:
    # a scripted model takes no Python module hooks (torch raises on a forward pre-hook);
    # its parameters take tensor hooks, and a step ends when a gradient arrives again
    torch.manual_seed(0)
    eager = zoo.mlp()
    scripted = torch.jit.script(eager)
    optimizer = torch.optim.SGD(scripted.parameters(), lr=0.1)
    with GradientStats(scripted) as grads:
        for _ in range(3):
            optimizer.zero_grad()
            scripted(torch.randn(2, 20)).sum().backward()
            optimizer.step()
    assert grads.num_steps == 3 and len(grads) == len(list(eager.parameters()))
    torch.testing.assert_close(grads["0.weight"].norm[2], eager[0].weight.grad.double().norm())
    assert grads.findings(max_norm=1e3) == [] and count_hooks(scripted) == 0


def test_device_gradient_reduction_agrees_with_the_host_one() -> None:
    from pytest_modelhooks.stats.reduce import finish_grads as _finish_grads
    from pytest_modelhooks.stats.reduce import grad_on_device as _grad_on_device

    torch.manual_seed(0)
    # (the device path derives the norm from the moments: a mean far above the spread too)
    offset = 1e3 + torch.randn(300_000)
    for grad in [torch.randn(7, 5) * 3, torch.randn(40).to(torch.bfloat16), offset, torch.ones(1)]:
        host = torch.tensor(grad_on_host(grad), dtype=torch.float64)
        device = _finish_grads(_grad_on_device(grad).reshape(1, -1), [grad.numel()])[0]
        torch.testing.assert_close(device, host, rtol=1e-5, atol=1e-6)
        norm = float(torch.linalg.vector_norm(grad.double()))
        assert float(device[0]) == pytest.approx(norm, rel=1e-6)


@pytest.mark.parametrize(("bad", "norm"), [(math.inf, math.inf), (-math.inf, math.inf), (math.nan, math.nan)])
def test_a_non_finite_gradient_has_the_norm_vector_norm_gives_on_the_device(bad: float, norm: float) -> None:
    from pytest_modelhooks.stats.reduce import finish_grads as _finish_grads
    from pytest_modelhooks.stats.reduce import grad_on_device as _grad_on_device

    grad = torch.randn(50)
    grad[3] = bad
    if math.isnan(bad):  # beside an infinity: NaN wins, as in vector_norm
        grad[9] = -math.inf
    row = _finish_grads(_grad_on_device(grad).reshape(1, -1), [grad.numel()])[0]
    expected = float(torch.linalg.vector_norm(grad))
    assert math.isnan(expected) if math.isnan(norm) else expected == norm
    assert (math.isnan(float(row[0])) and math.isnan(expected)) or float(row[0]) == expected
    assert float(row[4]) == float((~torch.isfinite(grad)).sum())


def test_a_subset_of_statistics_computes_only_those() -> None:
    model = nn.Sequential(nn.Linear(4, 8), InjectNaN(), nn.Linear(8, 2))
    with ActivationStats(model, modules="all", statistics=("mean", "std"), track_dead=False) as stats:
        model(torch.randn(3, 4))
    layer = stats["0"]
    assert not math.isnan(float(layer.mean[0])) and not math.isnan(float(layer.std[0]))
    assert all(math.isnan(float(layer[name][0])) for name in ("near_zero", "nonfinite", "min", "max"))
    assert layer.dead is None and bool(layer.ran[0])
    # the NaN layer is still found, without a count
    (finding,) = stats.findings()
    assert (finding.layer, finding.statistic) == ("1", "nonfinite") and math.isnan(finding.observed)
    with pytest.raises(ValueError, match=r"max_near_zero= needs 'near_zero' recorded"):
        stats.check(max_near_zero=0.5)
    with pytest.raises(ValueError, match=r"max_dead= needs dead units recorded"):
        stats.check(max_dead=0.5)


def test_device_reduction_of_a_subset() -> None:
    x = torch.randn(6, 7)
    wanted = frozenset({"min", "max"})
    raw = _stack_raw([reduce_on_device(x, 0.05, wanted)])
    finished = finish_device(raw, torch.tensor([42.0]))[0]
    assert torch.isnan(finished[:4]).all()
    assert float(finished[4]) == float(x.min()) and float(finished[5]) == float(x.max())


def test_unknown_statistics_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"statistics must be a non-empty collection of mean, std"):
        ActivationStats(zoo.mlp(), statistics=("median",))
    with pytest.raises(ValueError, match=r"got statistics='mean'"):
        ActivationStats(zoo.mlp(), statistics="mean")


def test_the_device_path_end_to_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """The accelerator code path (reduce on the device, stack per batch, finish on the host),
    run on the CPU, agrees with the host path."""
    model = nn.Sequential(nn.Linear(4, 8), InjectNaN(), nn.ReLU(), nn.Linear(8, 2))
    batches = [torch.randn(5, 4) for _ in range(2)]
    with ActivationStats(model, modules="all") as on_host:
        for batch in batches:
            model(batch)
    monkeypatch.setattr(activations, "on_host", lambda x: False)
    with ActivationStats(model, modules="all") as on_device:
        for batch in batches:
            model(batch)
    for host_layer, device_layer in zip(on_host, on_device, strict=True):
        for statistic in ("mean", "std", "near_zero", "nonfinite", "min", "max"):
            torch.testing.assert_close(
                device_layer[statistic], host_layer[statistic], equal_nan=True, rtol=1e-5, atol=1e-6
            )
        assert device_layer.dead == host_layer.dead
    assert on_device.findings()[0].layer == "1"
    with ActivationStats(model, modules="all", statistics=("mean", "std")) as lean:
        model(batches[0])
    assert lean.findings()[0].layer == "1"


@pytest.mark.parametrize("held", [True, False], ids=["held to the batch's end", "reduced in each hook"])
def test_the_device_path_adds_no_host_read_to_a_training_step(
    monkeypatch: pytest.MonkeyPatch, held: bool
) -> None:
    """What ``torch.cuda.set_sync_debug_mode`` checks on a GPU (test_cuda.py), checked on the
    CPU for CI: with the device path forced, recording activations and gradients adds no op
    that reads a value back to the host (``.item()``, ``bool()``, data-dependent shapes) to a
    training step; the step's own reads (the optimizer's) are counted without them too."""
    from torch.utils._python_dispatch import TorchDispatchMode

    syncing = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "unique"}

    class HostReads(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if func.__name__.split(".")[0] in syncing:
                self.seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    def steps(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
        torch.manual_seed(1)
        batches = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))) for _ in range(2)]
        with HostReads() as reads:
            for x, y in batches:
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
        return reads.seen

    monkeypatch.setattr(activations, "on_host", lambda x: False)
    if held:
        monkeypatch.setattr(gradients, "on_host", lambda grad: False)
    else:
        monkeypatch.setattr(gradients, "grad_on_host", reduce.grad_on_device)
    torch.manual_seed(0)
    model = zoo.ResNetish()  # BatchNorm, in-place ReLU, residual adds: dead units tracked
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    baseline = steps(model, optimizer)
    options = {} if held else {"max_held": 0}
    with ActivationStats(model, with_hist=True, **options) as stats, GradientStats(model) as grads:
        recorded = steps(model, optimizer)
    assert recorded == baseline
    assert stats.num_batches == 2 and grads.num_steps == 2
    assert not stats.findings(std=(1e-3, 1e3)) and not grads.findings(max_norm=1e3)


def test_a_module_called_twice_gets_a_series_per_call() -> None:
    model = zoo.Reused()
    seen: list[torch.Tensor] = []
    handle = model.shared.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    with ActivationStats(model) as stats:
        model(torch.randn(4, 6))
    handle.remove()
    assert stats.series_names == ["inp", "shared", "shared [call 2]"]
    for name, out in zip(["shared", "shared [call 2]"], seen, strict=True):
        assert float(stats[name].mean[0]) == pytest.approx(float(out.double().mean()), rel=1e-5, abs=1e-7)
    assert stats.stats.shape == (2, 2, 1)  # fastai layout: one row per hooked module (its first call)


def test_a_batch_mixing_host_and_device_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model spanning devices (or returning a CPU tensor from a GPU model) records each
    series through its own path, in one batch; simulated here by sending some tensors down
    the device path."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    batch = torch.randn(5, 4)
    with ActivationStats(model, modules="all", with_hist=True) as reference:
        model(batch)
    monkeypatch.setattr(activations, "on_host", lambda x: x.shape[-1] != 8)  # 8-wide outputs: "device"
    with ActivationStats(model, modules="all", with_hist=True) as mixed:
        model(batch)
        model(batch)
    assert mixed.num_batches == 2
    for expected, layer in zip(reference, mixed, strict=True):
        for statistic in ("mean", "std", "near_zero", "nonfinite", "min", "max"):
            torch.testing.assert_close(layer[statistic][:1], expected[statistic], rtol=1e-5, atol=1e-6)
        assert layer.hist is not None and expected.hist is not None
        assert torch.equal(layer.hist[0], expected.hist[0])


def test_fused_statistics_match_the_separate_passes() -> None:
    # one compiled pass (torch.compile, dynamic shapes) must give what the separate passes give
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 24), nn.Tanh(), nn.Linear(24, 3))
    batches = [torch.randn(9, 6) * 3, torch.randn(17, 6), torch.randn(5, 6)]
    batches[1][2, 0] = math.inf  # non-finite values downstream
    batches[2][0, 0] = math.nan
    with (
        warnings.catch_warnings(record=True) as caught,
        untouched(model),
        ActivationStats(model, modules="all", fused=True) as fused,
        ActivationStats(model, modules="all") as separate,
    ):
        warnings.simplefilter("always")
        for batch in batches:
            model(batch)
    if any("could not build the fused kernel" in str(warning.message) for warning in caught):
        pytest.skip("torch.compile cannot build kernels on this machine")
    assert fused.fused and fused.series_names == separate.series_names
    for name in separate.series_names:
        for statistic in ("mean", "std", "near_zero", "nonfinite", "min", "max"):
            torch.testing.assert_close(
                fused[name][statistic], separate[name][statistic], rtol=1e-5, atol=1e-6, equal_nan=True
            )
        assert fused[name].dead == separate[name].dead
    assert float(fused["0"].nonfinite[1]) == 40.0  # an inf input: every output of the first layer


@pytest.mark.parametrize("owner", ["ActivationStats", "GradientStats"])
def test_fused_falls_back_to_separate_passes_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, owner: str
) -> None:

    def cannot_compile(*args: Any) -> torch.Tensor:
        raise RuntimeError("no working C++ compiler\nmore detail")

    for function in (reduce.fused_raw, reduce.fused_grad_raw):
        monkeypatch.setitem(reduce._compiled, function, cannot_compile)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    recorder = (
        ActivationStats(model, fused=True) if owner == "ActivationStats" else GradientStats(model, fused=True)
    )
    with warnings.catch_warnings(record=True) as caught, recorder:
        warnings.simplefilter("always")
        for _ in range(3):
            model(torch.randn(2, 4)).sum().backward()
    assert [str(warning.message) for warning in caught] == [
        f"{owner}(fused=True): torch.compile could not build the fused kernel "
        "(RuntimeError: no working C++ compiler); using separate passes"
    ]
    assert not recorder.fused
    if isinstance(recorder, ActivationStats):
        assert recorder.num_batches == 3 and not torch.isnan(recorder["0"].mean).any()
    else:
        assert recorder.num_steps == 3 and not torch.isnan(recorder["0.weight"].norm).any()


def test_fused_gradient_statistics_match_the_separate_passes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 3))
    with (
        warnings.catch_warnings(record=True) as caught,
        GradientStats(model, fused=True) as fused,
        GradientStats(model) as separate,
    ):
        warnings.simplefilter("always")
        for scale in (1.0, 100.0):
            model(torch.randn(8, 6) * scale).pow(2).mean().backward()
            model.zero_grad()
    if any("could not build the fused kernel" in str(warning.message) for warning in caught):
        pytest.skip("torch.compile cannot build kernels on this machine")
    assert fused.fused and fused.num_steps == separate.num_steps == 2
    for name, _ in model.named_parameters():
        for statistic in ("norm", "mean", "std", "max_abs", "nonfinite"):
            torch.testing.assert_close(
                getattr(fused[name], statistic), getattr(separate[name], statistic), rtol=1e-5, atol=1e-7
            )


def test_the_std_of_a_single_value_is_zero_on_every_path() -> None:
    raw = torch.tensor([[2.0, math.nan, 0.0, 1.0, 2.0, 2.0], [math.nan] * 6], dtype=torch.float64)
    finished = finish_device(raw, torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert float(finished[0, 1]) == 0.0 and reduce_on_host(torch.tensor([2.0]), 0.05)[1] == 0.0
    assert math.isnan(float(finished[1, 1]))  # not recorded stays NaN


@pytest.mark.parametrize(("size", "nan_at"), [(2**24 + 3, None), (2**24 + 4, 7)])
def test_device_gradient_counts_stay_exact_past_float32s_integers(size: int, nan_at: int | None) -> None:
    from pytest_modelhooks.stats.reduce import finish_grads as _finish_grads
    from pytest_modelhooks.stats.reduce import grad_on_device as _grad_on_device

    grad = torch.ones(size)
    if nan_at is not None:
        grad[nan_at] = math.nan
    row = _finish_grads(_grad_on_device(grad).reshape(1, -1), [size])[0]
    assert float(row[4]) == (0.0 if nan_at is None else 1.0)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_nested_outputs_are_reduced_over_their_values_without_padding() -> None:
    # nn.TransformerEncoder in eval mode with a padding mask hands its layers nested tensors
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    src = torch.randn(3, 6, 16)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, 2:] = True  # the first sequence has 2 tokens, the others 6
    outputs: list[torch.Tensor] = []
    handle = model.layers[0].register_forward_hook(lambda m, a, out: outputs.append(out.detach()))
    with torch.no_grad(), untouched(model), ActivationStats(model, modules=["layers.0"]) as stats:
        model(src, src_key_padding_mask=mask)
    handle.remove()
    assert outputs[0].is_nested  # the case under test did happen
    values = torch.cat(outputs[0].unbind())  # 14 tokens of 16 features, no padding
    assert values.shape == (14, 16)
    row = stats["layers.0"]
    for name, expected in reference(values).items():
        assert float(row[name][0]) == pytest.approx(expected, rel=1e-5, abs=1e-6), name
    assert row.channels == 16 and row.dead == 0.0


def test_jagged_outputs_count_dead_features() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    with torch.no_grad():
        model[0].bias[:2] = -100.0  # features 0 and 1 never fire
    parts = [torch.randn(length, 4) for length in (2, 5, 3)]
    batch = torch.nested.nested_tensor(parts, layout=torch.jagged)
    with ActivationStats(model, modules="all") as stats:
        model(batch)
    relu = stats["1"]
    assert relu.channels == 6 and relu.dead == pytest.approx(2 / 6)
    expected = reference(model(torch.cat(parts)))
    assert float(relu.mean[0]) == pytest.approx(expected["mean"], rel=1e-5)
    assert float(relu.near_zero[0]) == pytest.approx(expected["near_zero"])


def test_each_backward_is_a_step_even_without_a_forward_in_between() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    with GradientStats(model) as grads:
        loss = model(torch.randn(3, 4)).square().sum()
        loss.backward(retain_graph=True)
        first = model.weight.grad.norm().item()
        loss.backward()  # accumulates: the .grad doubles
    assert grads.num_steps == 2
    norms = grads["weight"].norm.tolist()
    assert norms == pytest.approx([first, 2 * first], rel=1e-6)


def test_a_compiled_model_counts_steps_without_torch_warning_about_hooks() -> None:
    # torch.compile'd modules warn when torch sees global module hooks; a summary used to leave
    # one global hook's flag behind, so every compiled model after it warned
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    model_summary(model, (3, 4))
    compiled = torch.compile(model, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with GradientStats(compiled) as grads:
            for _ in range(2):
                compiled(torch.randn(3, 4)).sum().backward()
    assert grads.num_steps == 2 and grads.unused() == []
    assert count_hooks(compiled) == 0


def _scaled_steps(scaler: Any, steps: int, loss_factor: float = 1.0) -> GradientStats:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the same gradients every step
    batch = torch.randn(6, 4)
    with GradientStats(model, scaler=scaler) as grads:
        for _ in range(steps):
            scaler.scale(model(batch).sum() * loss_factor).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
    return grads


def test_gradient_scaler_statistics_are_in_the_unscaled_units() -> None:
    unscaled = _scaled_steps(torch.amp.GradScaler("cpu", enabled=False), 1)
    scaled = _scaled_steps(torch.amp.GradScaler("cpu", init_scale=1024.0), 1)
    for name in ("0.weight", "2.bias"):
        for statistic in ("norm", "mean", "std", "max_abs"):
            expected = getattr(unscaled[name], statistic)
            assert getattr(scaled[name], statistic).tolist() == pytest.approx(expected.tolist(), rel=1e-6)
    assert scaled.skipped_steps() == [] and unscaled.skipped_steps() == []


def test_a_step_the_scaler_skips_is_not_a_finding() -> None:
    # the first step overflows at a scale of 2**100; the scaler skips it and drops the scale
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100, backoff_factor=2.0**-40)
    grads = _scaled_steps(scaler, 3, loss_factor=1e10)
    assert grads.skipped_steps() == [0]
    norms = grads["0.weight"].norm
    assert math.isnan(norms[0]) and norms[1] == pytest.approx(float(norms[2])) and norms[1] > 1e9
    assert grads.findings(max_norm=1e12) == []
    assert [f.statistic for f in grads.findings(max_norm=1e9)] == ["grad norm"] * 4  # steps 1-2 judged


def test_only_overflowing_steps_under_a_scaler_is_one_finding() -> None:
    grads = _scaled_steps(torch.amp.GradScaler("cpu", init_scale=2.0**127), 2, loss_factor=1e10)
    assert grads.skipped_steps() == [0, 1]
    (finding,) = grads.findings(max_norm=1.0)
    assert finding.statistic == "nonfinite grad" and "every step (2) overflowed" in finding.note
    with pytest.raises(TypeError, match=r"scaler must be a torch\.amp\.GradScaler, got float"):
        GradientStats(nn.Linear(2, 2), scaler=1024.0)


def test_hooks_added_before_torch_compile_record_the_compiled_forwards() -> None:
    # dynamo traces into the hooks, which reduce with tensor ops while it compiles (a host
    # read would break the graph and log a screenful of warnings), and the numbers stay right
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    batch = torch.randn(32, 8)
    with ActivationStats(model, with_hist=True) as eager:
        model(batch)
    torch._dynamo.reset()
    counters.clear()
    with ActivationStats(model, with_hist=True) as stats:
        compiled = torch.compile(model, backend="eager")
        compiled(batch)
        compiled(batch)
    assert dict(counters["graph_break"]) == {}
    assert stats.num_batches == 2 and stats.series_names == eager.series_names
    for name in stats.series_names:
        for statistic in ("mean", "std", "near_zero", "min", "max"):
            assert stats[name][statistic].tolist() == pytest.approx([float(eager[name][statistic][0])] * 2)
        assert stats[name].dead == eager[name].dead
        assert torch.equal(stats[name].hist[0], eager[name].hist[0])
    assert count_hooks(model) == 0


def _sharded_gradient_stats(rank: int, store: str, out: str) -> None:
    """One rank of a two-process FSDP2 run: the same model and batch, sharded and not."""
    import copy

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"file://{store}")
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        reference = copy.deepcopy(model)
        fully_shard(model[0])
        fully_shard(model)
        batch = torch.randn(4, 8)  # the same on both ranks: FSDP2's averaged gradient is the plain one
        results: dict[str, Any] = {}
        for name, net in (("sharded", model), ("plain", reference)):
            optimizer = torch.optim.AdamW(net[0].parameters())  # the head left out
            with GradientStats(net) as grads:
                net(batch).sum().backward()
                optimizer.step()
            results[name] = grads.to_dict()
            results[f"{name} not updated"] = grads.not_updated()
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_gradients_sharded_by_fsdp2_are_measured_whole(tmp_path) -> None:
    # each rank holds half of each gradient: measured on its shard, the norm was the shard's
    # (1.91 for a parameter whose gradient norm is 4.29)
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch has no torch.distributed with gloo")
    out = str(tmp_path / "stats")
    context = mp.spawn(_sharded_gradient_stats, args=(str(tmp_path / "store"), out), nprocs=2, join=False)
    import time

    deadline = time.monotonic() + 120
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):  # True once both ended
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two FSDP2 ranks did not finish in 120 s")
    for rank in (0, 1):
        results = torch.load(f"{out}.{rank}")
        # each rank compares its own shard before and after the step
        assert results["sharded not updated"] == results["plain not updated"] == ["2.weight", "2.bias"]
        assert (
            results["sharded"].keys()
            == results["plain"].keys()
            == {"0.weight", "0.bias", "2.weight", "2.bias"}
        )
        for name, plain in results["plain"].items():
            for statistic, values in plain.items():
                assert results["sharded"][name][statistic] == pytest.approx(values, rel=1e-6), (
                    name,
                    statistic,
                )


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("where", ["model", "block"])
def test_activation_checkpointing_recomputes_are_not_batches(reentrant: bool, where: str) -> None:
    # backward reruns checkpointed forwards; run on the whole model, the rerun counted as a
    # batch (reentrant: twice the batches; every=2 recorded every batch, numbered 0, 2, 4, 6)
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
            self.head = nn.Linear(16, 2)
            self.checkpoint_block = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.checkpoint_block:
                return self.head(checkpoint(self.block, x, use_reentrant=reentrant))
            return self.head(self.block(x))

    torch.manual_seed(0)
    net = Net()
    batch = torch.randn(4, 8, requires_grad=True)

    def run(checkpointed: bool, every: int) -> ActivationStats:
        net.checkpoint_block = checkpointed and where == "block"
        with ActivationStats(net, every=every) as stats:
            for _ in range(4):
                if checkpointed and where == "model":
                    output = checkpoint(net, batch, use_reentrant=reentrant)
                else:
                    output = net(batch)
                output.sum().backward()
        return stats

    for every in (1, 2):
        plain, checkpointed = run(False, every), run(True, every)
        assert checkpointed.to_dict()["batches"] == plain.to_dict()["batches"] == list(range(0, 4, every))
        assert checkpointed.series_names == plain.series_names
        assert torch.equal(checkpointed.stats, plain.stats)


def _train(net: nn.Module, optimizer: Any, steps: int = 2, **kwargs: Any) -> GradientStats:
    with GradientStats(net, **kwargs) as grads:
        for _ in range(steps):
            optimizer.zero_grad()
            net(torch.randn(5, 4)).sum().backward()
            optimizer.step()
    return grads


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda params: torch.optim.SGD(params, lr=0.1), id="sgd"),
        pytest.param(lambda params: torch.optim.Adam(params, foreach=True), id="adam-foreach"),
        # fused kernels change values without bumping version counters
        pytest.param(lambda params: torch.optim.AdamW(params, fused=True), id="adamw-fused"),
        pytest.param(lambda params: torch.optim.SGD(params, lr=1e-6, fused=True), id="sgd-fused-tiny-lr"),
    ],
)
def test_parameters_left_out_of_the_optimizer_are_named(make: Any) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    grads = _train(net, make(list(net[0].parameters())))  # the head forgotten
    assert grads.updated() == {"0.weight": True, "0.bias": True, "2.weight": False, "2.bias": False}
    assert grads.not_updated() == ["2.weight", "2.bias"]
    with pytest.raises(HealthError) as raised:
        grads.check()
    assert [(f.layer, f.statistic) for f in raised.value.findings] == [
        ("2.weight", "update"),
        ("2.bias", "update"),
    ]
    name = type(make([nn.Parameter(torch.zeros(1))])).__name__
    assert [f.note for f in raised.value.findings] == [
        f"got a gradient but is in none of the param groups of {name}, the optimizer that stepped "
        f"(if frozen on purpose, call requires_grad_(False) on it)"
    ] * 2
    assert [(o.name, o.steps, o.params) for o in grads.stepped_optimizers()] == [
        (name, 2, ("0.weight", "0.bias"))
    ]
    everything = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    _train(everything, make(everything.parameters())).check()  # all updated: healthy
    grads.check(require_update=False)  # not looked at


def test_no_optimizer_step_is_not_judged_unless_required() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with GradientStats(net) as grads:
        net(torch.randn(5, 4)).sum().backward()
    assert set(grads.updated().values()) == {False} and grads.not_updated() == []
    grads.check()  # a backward-only test: nothing to judge
    with pytest.raises(
        HealthError, match=r"no parameter changed: no optimizer step ran inside the `with` block"
    ):
        grads.check(require_update=True)


def test_a_parameter_group_at_lr_0_counts_as_updated_and_a_zero_gradient_is_said() -> None:
    # lr=0 is a choice (the optimizer still writes the parameter); a fused step on a zero
    # gradient leaves the values and the version as they were, and the finding says why
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    frozen_by_lr = torch.optim.SGD(
        [{"params": net[0].parameters(), "lr": 0.0}, {"params": net[1].parameters()}], lr=0.1
    )
    _train(net, frozen_by_lr).check()

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.gated = nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x) + 0.0 * self.gated(x)  # a gradient, all zeros

    gated = Gated()
    grads = _train(gated, torch.optim.SGD(gated.parameters(), lr=0.1, fused=True))
    assert grads.not_updated() == ["gated.weight", "gated.bias"]
    assert [f.note for f in grads.findings()] == ["its gradient was zero at every step"] * 2


def test_zero_grad_between_backward_and_step_is_named() -> None:
    # the beginner's order: the step finds every .grad None and changes nothing, so no parameter
    # moved at all; the optimizer's own step hook shows it stepped, and on what
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(net.parameters())
    with GradientStats(net) as grads:
        for _ in range(2):
            net(torch.randn(5, 4)).sum().backward()
            optimizer.zero_grad()
            optimizer.step()
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert grads.lost_before_step() == dict.fromkeys(names, "AdamW")
    assert grads.not_updated() == names
    with pytest.raises(HealthError) as raised:
        grads.check()
    assert [f.layer for f in raised.value.findings] == names
    assert raised.value.findings[0].note == (
        "its .grad was None when AdamW.step() ran, so the step skipped it: "
        "zero_grad() between backward() and step()?"
    )
    _train(net, optimizer).check()  # zero_grad(); backward(); step(): healthy


def test_a_zero_initialised_partner_is_not_a_forgotten_parameter() -> None:
    # LoRA: B starts at zero, so A's first gradient is exactly zero and one fused Adam step
    # leaves it as it was (values and version); it is in the optimizer, and from the second
    # step on it learns
    class LoRA(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = nn.Linear(4, 4).requires_grad_(False)
            self.a = nn.Parameter(torch.randn(2, 4))
            self.b = nn.Parameter(torch.zeros(4, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + x @ self.a.T @ self.b.T

    torch.manual_seed(0)
    model = LoRA()
    one = _train(model, torch.optim.Adam(model.parameters(), fused=True), steps=1)
    assert one.not_updated() == ["a"]  # the raw fact
    one.check()  # not a finding: its optimizer holds it, and had nothing to apply yet
    with pytest.raises(HealthError, match=r"its gradient was zero at every step"):
        one.check(require_update=True)
    _train(model, torch.optim.Adam(model.parameters(), fused=True), steps=2).check(require_update=True)


def test_the_optimizers_that_stepped_tell_why_a_parameter_stayed() -> None:
    class Still(torch.optim.Optimizer):
        """Steps on nothing: a custom optimizer with a bug."""

        def __init__(self, params: Any) -> None:
            super().__init__(params, {"lr": 0.1})

        def step(self, closure: Any = None) -> None:
            return None

    torch.manual_seed(0)
    gan = nn.ModuleDict({"generator": nn.Linear(4, 4), "critic": nn.Linear(4, 1)})
    other = nn.Linear(4, 4)  # another model's optimizer steps too: not listed
    gen_opt = torch.optim.SGD(gan["generator"].parameters(), lr=0.1, fused=True)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with GradientStats(gan) as grads:
        gen_opt.zero_grad()
        gan["critic"](gan["generator"](torch.randn(3, 4))).sum().backward()  # a generator step
        gen_opt.step()
        other(torch.randn(2, 4)).sum().backward()
        other_opt.step()
    assert [o.name for o in grads.stepped_optimizers()] == ["SGD"]
    notes = {f.layer: f.note for f in grads.findings()}
    assert notes == dict.fromkeys(
        ["critic.weight", "critic.bias"],
        "got a gradient but is in none of the param groups of SGD, the optimizer that stepped "
        "(if frozen on purpose, call requires_grad_(False) on it)",
    )
    grads.check(require_update=False)  # a generator-only step: the critic is left out on purpose

    net = nn.Linear(4, 2)
    still = Still(net.parameters())
    mixed = torch.optim.SGD(
        [{"params": [net.weight], "lr": 0.0}, {"params": [net.bias], "lr": 0.1}], fused=True
    )
    with GradientStats(net) as grads:
        net(torch.randn(3, 4)).sum().backward()
        still.step()
    assert [f.note for f in grads.findings()] == [
        "in a param group of Still with a gradient, yet its step left it unchanged"
    ] * 2
    with GradientStats(net) as grads:
        net(torch.randn(3, 4)).sum().backward()
        mixed.step()  # fused: lr 0 changes neither values nor versions, and is a choice
    (stepped,) = grads.stepped_optimizers()
    assert stepped.zero_lr == ("weight",) and grads.not_updated() == ["weight"]
    grads.check()


def test_the_optimizer_hook_is_gone_after_the_block_also_when_it_raises() -> None:
    from torch.optim import optimizer as optimizer_module

    before = len(optimizer_module._global_optimizer_pre_hooks)
    net = nn.Linear(4, 2)
    with pytest.raises(RuntimeError, match="boom"), GradientStats(net):
        assert len(optimizer_module._global_optimizer_pre_hooks) == before + 1
        raise RuntimeError("boom")
    assert len(optimizer_module._global_optimizer_pre_hooks) == before


def test_a_recorder_never_stopped_does_not_keep_its_model_alive() -> None:
    # torch holds tensor hooks on its C++ side, out of the garbage collector's sight: a hook
    # holding the recorder (which holds the model) kept both for the life of the process
    from torch.optim import optimizer as optimizer_module

    global_hooks = len(optimizer_module._global_optimizer_pre_hooks)
    model = nn.Linear(3, 2)
    grads = GradientStats(model)
    grads.start()  # and never stop()
    model(torch.randn(2, 3)).sum().backward()
    assert grads.num_steps == 1
    alive = weakref.ref(model)
    del grads, model
    gc.collect()
    assert alive() is None
    assert len(optimizer_module._global_optimizer_pre_hooks) == global_hooks


def test_updated_while_recording_compares_with_now_and_meta_values_are_unknown() -> None:
    net = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with GradientStats(net) as grads:
        net(torch.randn(3, 4)).sum().backward()
        assert grads.updated() == {"weight": False, "bias": False}
        optimizer.step()
        assert grads.updated() == {"weight": True, "bias": True}
    with torch.device("meta"):
        on_meta = nn.Linear(4, 2)
    with GradientStats(on_meta) as meta_grads:
        on_meta(torch.randn(3, 4, device="meta")).sum().backward()
    assert meta_grads.updated() == {"weight": None, "bias": None}
    assert meta_grads.not_updated() == []


def test_lazy_layers_are_tracked_from_their_first_forward() -> None:
    # an uninitialized lazy parameter takes no hook: GradientStats(model) raised torch's
    # "Attempted to use an uninitialized parameter" before the model ever ran
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.LazyLinear(2))
    with GradientStats(model) as never_run:
        pass
    assert never_run.updated() == dict.fromkeys(["0.weight", "0.bias", "2.weight", "2.bias"], None)
    optimizer = None
    with GradientStats(model) as grads:
        for _ in range(2):
            model(torch.randn(4, 5)).sum().backward()
            if optimizer is None:  # built once the shapes exist; the first layer left out
                optimizer = torch.optim.SGD(model[2].parameters(), lr=0.1)
            optimizer.step()
    assert grads.num_steps == 2 and grads.unused() == []
    assert not grads["0.weight"].norm.isnan().any()  # the first step was recorded too
    assert grads["0.weight"].shape == (8, 5)
    assert grads.not_updated() == ["0.weight", "0.bias"]
    assert count_hooks(model) == 0
    # a forward that fails before the lazy layers exist leaves no hook behind either
    fresh = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(RuntimeError, match="cannot be multiplied"), GradientStats(fresh):
        fresh(torch.randn(4, 5)).sum().backward()
    assert count_hooks(fresh) == 0


def test_a_quantized_model_is_recorded_through_its_dequantized_activations() -> None:
    # torch.ao quantization: layers keep packed weights (no nn.Parameter), and a statically
    # quantized model passes quint8 tensors between layers
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's eager quantization is deprecated for torchao
        torch.manual_seed(0)
        dynamic = torch.ao.quantization.quantize_dynamic(zoo.mlp(), {nn.Linear}, dtype=torch.qint8)

        class Static(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.quant = torch.ao.quantization.QuantStub()
                self.dequant = torch.ao.quantization.DeQuantStub()
                self.conv, self.relu = nn.Conv2d(3, 4, 3), nn.ReLU()

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.dequant(self.relu(self.conv(self.quant(x))))

        model = Static().eval()
        model.qconfig = torch.ao.quantization.get_default_qconfig("fbgemm")
        prepared = torch.ao.quantization.prepare(model)
        prepared(torch.randn(8, 3, 8, 8))
        static = torch.ao.quantization.convert(prepared)
    with ActivationStats(dynamic) as stats:  # the default: the layers with (packed) weights
        dynamic(torch.randn(16, 20))
    assert stats.series_names == [
        name for name, module in zoo.mlp().named_children() if isinstance(module, nn.Linear)
    ]
    seen: list[torch.Tensor] = []
    handle = static.conv.register_forward_hook(lambda m, a, out: seen.append(out.dequantize()))
    with ActivationStats(static) as stats:
        static(torch.randn(4, 3, 8, 8))
    handle.remove()
    assert stats.series_names == ["conv"]
    expected = seen[0].double()
    assert float(stats["conv"].std[0]) == pytest.approx(float(expected.std()), rel=1e-6)
    assert float(stats["conv"].min[0]) == pytest.approx(float(expected.min()))
    assert stats.findings() == [] and count_hooks(static) == 0


@pytest.mark.parametrize(
    ("shape", "axis"),
    [((4, 16, 7, 7), 1), ((4, 16, 20, 20), 1), ((3, 5, 8), 2), ((3, 5, 8), 1), ((6, 9), 1), ((5, 3, 3), 0)],
)
def test_the_host_channel_maxima_are_those_of_one_reduction(shape: tuple[int, ...], axis: int) -> None:
    from pytest_modelhooks.stats.host import host_channel_max

    torch.manual_seed(0)
    x = torch.randn(shape)
    x.view(-1)[5] = math.nan  # a NaN wins its channel's maximum, whichever way it is taken
    rest = [dim for dim in range(x.dim()) if dim != axis]
    for tensor in (x, x.transpose(0, -1).contiguous().transpose(0, -1)):  # and another layout
        torch.testing.assert_close(host_channel_max(tensor, axis), tensor.amax(dim=rest), equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_counts_on_the_device_path_are_those_of_a_float32_copy(dtype: torch.dtype) -> None:
    from pytest_modelhooks.stats.reduce import reduce_on_device, reduce_rows

    eps = 0.05
    # every value of the dtype around the threshold, both signs, and the non-finite ones
    around = torch.tensor(eps, dtype=dtype)
    values = [around]
    for _ in range(4):
        values += [torch.nextafter(values[-1], torch.tensor(math.inf, dtype=dtype))]
        values.insert(0, torch.nextafter(values[0], torch.tensor(-math.inf, dtype=dtype)))
    x = torch.stack(values)
    x = torch.cat([x, -x, torch.tensor([math.inf, -math.inf, math.nan, 0.0], dtype=dtype)])
    copy = x.float().abs()
    expected = (float((copy <= eps).sum()), float((copy <= torch.finfo(torch.float32).max).sum()))
    parts = reduce_on_device(x, eps)
    assert (float(parts[2]), float(parts[3])) == expected
    rows, _ = reduce_rows(torch.stack([x, x]), eps)
    assert rows[:, 2].tolist() == [expected[0]] * 2 and rows[:, 3].tolist() == [expected[1]] * 2
