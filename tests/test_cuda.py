"""Checks that need a GPU; skipped without one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pytest_modelhooks import ActivationStats, GradientStats, model_sizes, model_summary
from tests import zoo
from tests.helpers import untouched

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_sizes_and_summary_text_are_the_same_on_cuda_and_cpu() -> None:
    model, batch = zoo.build("resnetish")
    cpu_sizes = model_sizes(model, input=batch, modules="leaves")
    cpu_text = str(model_summary(model, input_data=batch))
    model.cuda()
    with untouched(model):
        cuda_sizes = model_sizes(model, input=batch.cuda(), modules="leaves")
        cuda_text = str(model_summary(model, input_data=batch.cuda()))
    assert cuda_sizes == cpu_sizes and cuda_sizes.engine == "meta"
    assert cuda_text == cpu_text
    assert next(model.parameters()).device.type == "cuda"


def test_activation_stats_never_synchronise_during_the_forward() -> None:
    model, batch = zoo.build("resnetish")
    model.cuda()
    batch = batch.cuda()
    with ActivationStats(model, modules="all", with_hist=True) as stats, GradientStats(model) as grads:
        model(batch)  # warm-up: first-call allocations may synchronise
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                model(batch).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert stats.num_batches == 4 and grads.num_steps == 3
    assert not torch.isnan(stats.stats).any()


def test_cuda_statistics_match_the_cpu_ones() -> None:
    model, batch = zoo.build("mlp")
    model.eval()
    with ActivationStats(model, modules="all") as on_cpu:
        model(batch)
    model.cuda()
    with ActivationStats(model, modules="all") as on_cuda:
        model(batch.cuda())
    for cpu_layer, cuda_layer in zip(on_cpu, on_cuda, strict=True):
        for statistic in ("mean", "std", "near_zero", "nonfinite", "min", "max"):
            torch.testing.assert_close(cuda_layer[statistic], cpu_layer[statistic], rtol=1e-5, atol=1e-6)
        assert cuda_layer.dead == cpu_layer.dead


def test_an_input_on_the_wrong_device_is_named() -> None:
    model = zoo.mlp().cuda()
    with pytest.raises(ValueError, match=r"input is on cpu but the weights of Sequential are on cuda:0"):
        model_sizes(model, input=torch.zeros(1, 20))


def test_non_finite_values_are_counted_on_the_device() -> None:
    class InjectNaN(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            x[0, :3] = float("nan")
            return x

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), InjectNaN(), torch.nn.Linear(8, 2)).cuda()
    with ActivationStats(model, modules="all") as stats:
        model(torch.randn(5, 4, device="cuda"))
    assert float(stats["1"].nonfinite[0]) == 3
    assert float(stats["0"].nonfinite[0]) == 0
    assert stats.findings()[0].layer == "1"
    near = stats["0"]
    assert 0 <= float(near.near_zero[0]) <= 1


def test_the_plugin_fixtures_run_end_to_end_on_cuda(pytester: pytest.Pytester) -> None:
    # CPU-built models and inputs move to the GPU; statistics stay there; the summary text is
    # the CPU's (the snapshot is written on the CPU, then compared on CUDA)
    pytester.makepyfile(
        test_gpu="""
        import torch
        from torch import nn

        def net():
            torch.manual_seed(0)
            layers = [nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4)]
            return nn.Sequential(*layers)

        def built():
            model = net()
            model(torch.randn(1, 3, 8, 8))  # initialise the lazy head on the CPU
            return model

        def test_summary(model_summary, model_snapshot):
            assert model_summary(built(), input_size=(1, 3, 8, 8)) == model_snapshot

        def test_stats_and_grads(activation_stats, gradient_stats, hooked_model, modelhooks_device):
            model = built()
            hooks = hooked_model(model, modules=["0"])
            with activation_stats(model) as stats, gradient_stats(model) as grads:
                model(torch.randn(4, 3, 8, 8, device=modelhooks_device)).sum().backward()
            assert next(model.parameters()).device == modelhooks_device
            assert hooks["0"].stored.device == modelhooks_device
            stats.check(std=(1e-3, 1e3))
            grads.check()
        """
    )
    from importlib import metadata

    # a checkout that is not pip-installed has no entry point: name the plugin
    installed = any(entry.name == "modelhooks" for entry in metadata.entry_points(group="pytest11"))
    plugin = [] if installed else ["-p", "pytest_modelhooks.plugin"]
    pytester.runpytest_subprocess(*plugin, "--snapshot-update").assert_outcomes(passed=2)
    result = pytester.runpytest_subprocess(*plugin, "--modelhooks-device=cuda")
    result.assert_outcomes(passed=2)


def test_cudnn_recurrent_layers_count_the_same_mult_adds_as_meta() -> None:
    # cuDNN runs every layer and direction of an LSTM as one op with its own flop formula here
    lstm = torch.nn.LSTM(8, 16, num_layers=2, bidirectional=True, batch_first=True).cuda()
    batch = torch.randn(2, 5, 8, device="cuda")
    meta = model_summary(lstm, input_data=batch, engine="meta")
    real = model_summary(lstm, input_data=batch, engine="real")
    assert real.mult_adds == meta.mult_adds == 10 * 2 * 4 * 16 * (8 + 16 + 32 + 16)
    assert str(real) == str(meta)


def test_gradient_scaler_steps_read_the_scale_without_a_sync() -> None:
    model, batch = zoo.build("mlp")
    model.cuda().eval()  # no dropout: the same gradients twice
    batch = batch.cuda()
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    with GradientStats(model) as plain:
        model(batch).sum().backward()
    model.zero_grad()
    with GradientStats(model, scaler=scaler) as grads:
        scaler.scale(model(batch).sum())  # creates the scale tensor
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.scale(model(batch).sum()).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for name in ("0.weight", "0.bias"):
        torch.testing.assert_close(grads[name].norm, plain[name].norm, rtol=1e-5, atol=0.0)


def test_the_command_line_runs_a_health_check_on_cuda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pytest_modelhooks.cli import main

    (tmp_path / "gpu_models.py").write_text(
        "from torch import nn\n"
        "def net(width):\n"
        "    return nn.Sequential(nn.Conv2d(3, width, 3), nn.BatchNorm2d(width), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 2))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["health", "gpu_models:net(width=8)", "--input-size", "8,3,16,16", "--train", "--format", "json"]
    assert main([*argv, "--device", "cuda"]) == 0
    on_cuda = capsys.readouterr().out
    assert main(argv) == 0
    assert '"0.weight"' in on_cuda and on_cuda.count("mean") == capsys.readouterr().out.count("mean")


def test_a_fused_cuda_optimizer_that_left_out_a_layer_is_named() -> None:
    # fused AdamW (the common GPU choice) changes values without bumping version counters;
    # the fingerprints are taken on the device at the block's ends only
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).cuda()
    optimizer = torch.optim.AdamW(model[0].parameters(), fused=True)
    batch = torch.randn(8, 16, device="cuda")
    with GradientStats(model) as grads:
        for _ in range(2):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")  # our hooks: no sync (the optimizer may)
            try:
                model(batch).sum().backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            optimizer.step()
            optimizer.zero_grad()
    assert grads.not_updated() == ["2.weight", "2.bias"]


def test_sparse_and_complex_gradients_read_the_same_on_cuda_as_on_the_cpu() -> None:
    # the device path counts finite real numbers (two per complex element) and reduces a
    # sparse gradient from its stored values: both must agree with the host path
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {"table": torch.nn.Embedding(50, 4, sparse=True), "mix": torch.nn.Linear(4, 3, dtype=torch.complex64)}
    )
    ids = torch.tensor([3, 7, 3, 3])

    def step(device: str) -> GradientStats:
        model.to(device).zero_grad(set_to_none=True)
        with GradientStats(model) as grads:
            rows = model["table"](ids.to(device)).to(torch.complex64)
            model["mix"](rows).abs().sum().backward()
        return grads

    on_cpu, on_cuda = step("cpu").to_dict(), step("cuda").to_dict()
    assert on_cuda.keys() == on_cpu.keys()
    for name, statistics in on_cpu.items():
        for statistic, values in statistics.items():
            assert on_cuda[name][statistic] == pytest.approx(values, rel=1e-5, abs=1e-7), (name, statistic)
    assert all(statistics["nonfinite"] == [0.0] for statistics in on_cuda.values())


def test_dependency_checks_run_on_cuda_as_on_the_cpu() -> None:
    from pytest_modelhooks import batch_leaks, causal_leaks, nondeterministic_layers
    from tests.test_leaks import Decoder, tokens

    torch.manual_seed(0)
    model = Decoder(causal=False)
    cpu = [f.layer for f in causal_leaks(model, tokens())]
    model.cuda()
    with untouched(model):
        assert (
            [f.layer for f in causal_leaks(model, tokens().cuda())]
            == cpu
            == ["blocks.0.attn", "blocks.1.attn"]
        )
        assert batch_leaks(model, tokens().cuda()) == []
        assert nondeterministic_layers(model, tokens().cuda()) == []


@pytest.mark.parametrize("name", ["resnetish", "transformer", "unet"])
def test_the_memory_report_of_a_model_on_a_gpu_is_what_its_real_step_allocates(name: str) -> None:
    from pytest_modelhooks import model_memory

    model, batch = zoo.build(name)
    model, batch = model.cuda(), batch.cuda()
    with untouched(model):
        fake = model_memory(model, batch)
        real = model_memory(model, batch, engine="real")
    assert fake.rounding == 512 and fake.device == "cuda"
    assert fake.to_dict() == real.to_dict()


def test_cpu_and_cuda_runs_agree_layer_by_layer_and_a_cuda_only_bug_is_named() -> None:
    from torch import nn

    from pytest_modelhooks.divergence import first_divergence

    model, batch = zoo.build("resnetish")
    with untouched(model):
        assert first_divergence(model, batch, against="cuda", rtol=1e-3, atol=1e-4) == []

    class OnlyOnCuda(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if x.is_cuda else x  # the bug: another computation on the GPU

    net = nn.Sequential(nn.Linear(4, 4), OnlyOnCuda(), nn.Linear(4, 2))
    (finding,) = first_divergence(net, torch.randn(3, 4), against="cuda")
    assert (finding.layer, finding.layer_type) == ("1", "OnlyOnCuda")


def test_a_decoder_given_a_filled_cache_agrees_with_its_cuda_run() -> None:
    # each attention call's cache is copied onto the GPU with the block it runs again
    transformers = pytest.importorskip("transformers")
    from pytest_modelhooks.divergence import first_divergence

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)
    model = transformers.GPT2LMHeadModel(config).eval()
    past = model(torch.randint(0, 64, (1, 6))).past_key_values
    assert past.get_seq_length() == 6
    found = first_divergence(
        model, torch.randint(0, 64, (1, 2)), past_key_values=past, against="cuda", rtol=1e-3, atol=1e-4
    )
    assert found == []


def test_held_reductions_on_cuda_match_the_ones_in_each_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU outputs are held to the batch's end and gradients to the backward's end; the
    numbers are those of reducing each tensor in its hook, with channels_last and bf16 too."""
    from pytest_modelhooks.stats import gradients

    torch.manual_seed(0)
    model = zoo.ResNetish().cuda().to(memory_format=torch.channels_last)
    batches = [torch.randn(4, 3, 16, 16, device="cuda") for _ in range(3)]

    def run(**options: object) -> tuple[ActivationStats, GradientStats]:
        torch.manual_seed(1)
        with ActivationStats(model, modules="all", **options) as stats, GradientStats(model) as grads:
            for batch in batches:
                model.zero_grad()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = model(batch)
                out.float().square().mean().backward()
        return stats, grads

    held, held_grads = run()
    monkeypatch.setattr(gradients.GradientStats, "_hold", lambda self, grad: False)
    in_hooks, hook_grads = run(max_held=0)
    assert held._holdable and held._in_place
    for one, other in zip(in_hooks, held, strict=True):
        for statistic in ("mean", "std", "near_zero", "nonfinite", "min", "max"):
            torch.testing.assert_close(other[statistic], one[statistic], rtol=1e-4, atol=1e-5, equal_nan=True)
        assert other.dead == one.dead
    torch.testing.assert_close(held_grads._gather(), hook_grads._gather(), rtol=1e-4, atol=1e-6)


def test_bf16_counts_and_gradient_norms_on_cuda_are_exact() -> None:
    """bf16 outputs are counted on the GPU without a float32 copy, and gradient norms are
    derived from the moments there: what a float32 copy and ``vector_norm`` give."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8))
    model = model.cuda().to(torch.bfloat16)
    batch = torch.randn(32, 64, dtype=torch.bfloat16, device="cuda") * 0.05  # values near eps
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(
            lambda m, a, out, name=name: outputs.__setitem__(name, out.detach().clone())
        )
        for name, module in model.named_children()
    ]
    with ActivationStats(model, modules="all") as stats, GradientStats(model) as grads:
        model(batch).float().square().mean().backward()
    for handle in handles:
        handle.remove()
    for name, out in outputs.items():
        copy = out.float().cpu()
        assert float(stats[name].near_zero[0]) == float((copy.abs() <= stats.eps).double().mean()), name
        assert float(stats[name].nonfinite[0]) == 0.0, name
    for name, param in model.named_parameters():
        assert param.grad is not None
        norm = param.grad.double().norm().cpu()
        torch.testing.assert_close(grads[name].norm[0], norm, rtol=1e-4, atol=0.0)
