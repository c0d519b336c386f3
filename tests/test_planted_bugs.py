"""Planted bugs in small models shaped like real architectures (tests/architectures.py): each
bug is caught and named at its layer, and each healthy model passes every check with the
defaults (and the documented bounds, its zero-initialised layers exempted)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pytest_modelhooks import (
    ActivationStats,
    GradientStats,
    HealthError,
    batch_leaks,
    causal_leaks,
    check_batch_independence,
    check_causal,
    check_deterministic,
    model_summary,
    nondeterministic_layers,
)
from pytest_modelhooks.report.text import snapshot_text
from pytest_modelhooks.snapshot import change_report
from tests.architectures import GPT, Bugs, ConvNeXt, DiT, UNet, ViT, Whisper

# the documented bounds (docs/health.md)
STD, MAX_DEAD, MAX_GRAD_NORM = (0.001, 50.0), 0.8, 1e5


def _gpt_inputs() -> tuple[Any, ...]:
    return (torch.randint(0, 64, (4, 12)),)


def _dit_inputs() -> tuple[Any, ...]:
    return torch.randn(4, 3, 16, 16), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))


def _image_inputs(side: int) -> Callable[[], tuple[Any, ...]]:
    return lambda: (torch.randn(4, 3, side, side),)


def _whisper_inputs() -> tuple[Any, ...]:
    return torch.randn(4, 8, 32), torch.randint(0, 50, (4, 10))


def _first(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


@dataclass
class Case:
    build: Callable[[Bugs | None], nn.Module]
    inputs: Callable[[], tuple[Any, ...]]
    causal: bool = False  # a decoder: position t may use positions <= t only
    exclude: str | None = None  # zero-initialised by design
    output: int | None = None  # which output the dependence checks follow

    def loss(self, model: nn.Module, inputs: tuple[Any, ...]) -> torch.Tensor:
        output = _first(model(*inputs))
        if output.shape[-1] == 10 and output.dim() == 2:  # a classifier's logits
            return F.cross_entropy(output, torch.arange(output.shape[0]) % 10)
        return output.float().pow(2).mean()


CASES = {
    "gpt": Case(GPT, _gpt_inputs, causal=True, output=0),
    "dit": Case(DiT, _dit_inputs, exclude="**.adaLN_modulation"),
    "convnext": Case(ConvNeXt, _image_inputs(32)),
    "unet": Case(UNet, _image_inputs(16)),
    "whisper": Case(Whisper, _whisper_inputs, causal=True),
    "vit": Case(ViT, _image_inputs(16), exclude="head"),
}


def _model(case: Case, bugs: Bugs | None = None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return case.build(bugs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_healthy_model_passes_every_check_with_the_defaults(name: str) -> None:
    case = CASES[name]
    model = _model(case)
    inputs = case.inputs()
    summary = model_summary(model, input_data=inputs)
    assert summary.total_params == sum(param.numel() for param in model.parameters())

    model.train()
    with ActivationStats(model) as stats:
        for _ in range(2):
            model(*case.inputs())
    stats.check()
    stats.check(std=STD, max_dead=MAX_DEAD, exclude=case.exclude)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with GradientStats(model) as grads:
        for _ in range(2):
            case.loss(model, inputs).backward()
            optimizer.step()
            optimizer.zero_grad()
    grads.check()
    grads.check(max_norm=MAX_GRAD_NORM)

    model.eval()
    options = {} if case.output is None else {"output": case.output}
    check_batch_independence(model, inputs, **options)
    check_deterministic(model, inputs)
    if case.causal:
        check_causal(model, inputs, **options)


# --- nanoGPT-style decoder -------------------------------------------------------------------


def test_a_forgotten_causal_mask_is_named_at_every_attention() -> None:
    model = _model(CASES["gpt"], Bugs(mask="none")).eval()
    found = causal_leaks(model, _gpt_inputs(), output=0)
    assert {finding.layer for finding in found} == {"blocks.0.attn", "blocks.1.attn"}


def test_a_mask_shifted_by_one_is_caught_with_how_far_it_sees() -> None:
    model = _model(CASES["gpt"], Bugs(mask="shifted")).eval()
    with pytest.raises(HealthError, match="later position") as raised:
        check_causal(model, _gpt_inputs(), output=0)
    assert "blocks.0.attn" in str(raised.value)
    assert all("at later position(s) 1 " in (finding.note or "") for finding in raised.value.findings)


def test_a_nan_in_the_positions_fails_the_dependence_checks_instead_of_passing() -> None:
    model = _model(CASES["gpt"], Bugs(mask="none", nan_position=True)).eval()
    for check in (check_causal, check_batch_independence):
        with pytest.raises(HealthError) as raised:
            check(model, _gpt_inputs(), output=0)
        assert [finding.statistic for finding in raised.value.findings] == ["nonfinite"]
        assert "wpe" in str(raised.value)


def test_attention_dropout_left_on_in_eval_is_named() -> None:
    model = _model(CASES["gpt"], Bugs(eval_dropout=True)).eval()
    found = nondeterministic_layers(model, _gpt_inputs())
    assert {finding.layer for finding in found} == {"blocks.0.attn", "blocks.1.attn"}


def test_a_forward_keyword_argument_reaches_the_checks() -> None:
    """nanoGPT's forward takes targets=: the checks pass it on and follow the logits."""
    model = _model(CASES["gpt"], Bugs(mask="none")).eval()
    tokens = _gpt_inputs()[0]
    found = causal_leaks(model, (tokens,), output=0, targets=tokens)
    assert {finding.layer for finding in found} == {"blocks.0.attn", "blocks.1.attn"}


def test_an_optimizer_that_forgot_the_final_norm_is_named() -> None:
    model = _model(CASES["gpt"]).train()
    optimizer = torch.optim.AdamW(model.blocks.parameters(), lr=1e-3)
    tokens = _gpt_inputs()[0]
    with GradientStats(model) as grads:
        for _ in range(2):
            _, loss = model(tokens, targets=tokens)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    not_updated = {finding.layer for finding in grads.findings() if finding.statistic == "update"}
    assert not_updated == {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"}


# --- diffusion transformer --------------------------------------------------------------------


def test_a_label_embedding_averaged_over_the_batch_is_a_leak_through_an_integer_input() -> None:
    model = _model(CASES["dit"], Bugs(batch_mean_label=True)).eval()
    (finding,) = batch_leaks(model, _dit_inputs())
    assert (finding.layer, finding.layer_type) == ("", "DiT")
    # placed where it happens: after the label embedding, before the first layer that reads it
    assert "between 'y_embedder' and 'blocks.0.adaLN_modulation.0'" in finding.note
    # the zero gates hide it at init (the output does not change yet): the check says how it saw
    assert "blocks.0.adaLN_modulation.1.weight" in finding.note


def test_label_dropout_left_on_in_eval_is_found_however_rare() -> None:
    model = _model(CASES["dit"], Bugs(label_dropout_in_eval=True)).eval()
    with pytest.raises(HealthError, match="y_embedder"):
        check_deterministic(model, _dit_inputs())


def test_adaln_zero_is_zero_initialised_by_design_not_vanishing() -> None:
    model = _model(CASES["dit"]).train()
    with ActivationStats(model) as stats:
        model(*_dit_inputs())
    assert float(stats["blocks.0.adaLN_modulation.1"].std[0]) == 0.0
    assert stats.findings(std=STD) == []


# --- ConvNeXt ---------------------------------------------------------------------------------


def test_a_layer_scale_typo_explodes_and_is_named() -> None:
    model = _model(CASES["convnext"], Bugs(layer_scale_init=1e3)).train()
    with ActivationStats(model) as stats:
        model(torch.randn(4, 3, 32, 32))
    exploding = [finding for finding in stats.findings(std=STD) if finding.statistic == "std"]
    assert exploding and exploding[0].layer.startswith("stage1.")


def test_stochastic_depth_left_on_in_eval_is_named() -> None:
    model = _model(CASES["convnext"], Bugs(drop_path_in_eval=True)).eval()
    found = nondeterministic_layers(model, torch.randn(4, 3, 32, 32))
    assert {finding.layer for finding in found} == {f"stage{s}.{b}.drop_path" for s in (1, 2) for b in (0, 1)}


def test_an_accidentally_frozen_stem_is_named_in_the_snapshot_diff() -> None:
    model = _model(CASES["convnext"])
    before = snapshot_text(model_summary(model, input_data=(torch.randn(1, 3, 32, 32),)))
    model.stem.requires_grad_(False)
    after = snapshot_text(model_summary(model, input_data=(torch.randn(1, 3, 32, 32),)))
    report = "\n".join(change_report(before, after))
    assert "trainable params" in report
    assert "stem.0" in report and "stem.1" in report and "stage1" not in report


# --- U-Net ------------------------------------------------------------------------------------


def test_a_dead_bottleneck_is_named() -> None:
    model = _model(CASES["unet"], Bugs(dead_bias=-20.0)).train()
    with ActivationStats(model) as stats:
        model(torch.randn(4, 3, 16, 16))
    dead = [finding.layer for finding in stats.findings(max_dead=MAX_DEAD) if finding.statistic == "dead"]
    assert dead and all(layer.startswith("mid") for layer in dead)


def test_centering_over_the_batch_is_a_batch_leak() -> None:
    model = _model(CASES["unet"], Bugs(batch_centering=True)).eval()
    with pytest.raises(HealthError, match="sample"):
        check_batch_independence(model, (torch.randn(4, 3, 16, 16),))


def test_a_detached_bottleneck_leaves_its_weights_without_a_gradient() -> None:
    model = _model(CASES["unet"], Bugs(detached_bottleneck=True)).train()
    with GradientStats(model) as grads:
        model(torch.randn(4, 3, 16, 16)).pow(2).mean().backward()
    ((layer, kind, note),) = [
        (finding.layer, finding.layer_type, finding.note) for finding in grads.findings()
    ]
    assert (layer, kind) == ("mid", "ConvUnit, 4 parameters")
    assert note.startswith("unused: 'mid' ran, but none of its output reached the loss")


# --- Whisper-style encoder-decoder ------------------------------------------------------------


def test_a_decoder_without_its_mask_is_caught_and_the_audio_is_not_blamed() -> None:
    model = _model(CASES["whisper"], Bugs(mask="none")).eval()
    found = causal_leaks(model, _whisper_inputs())
    assert {finding.layer for finding in found} == {"decoder.0.attn", "decoder.1.attn"}


def test_a_centred_convolution_over_the_decoders_tokens_looks_one_ahead() -> None:
    model = _model(CASES["whisper"], Bugs(decoder_conv=True)).eval()
    found = causal_leaks(model, _whisper_inputs())
    assert [finding.layer for finding in found] == ["token_mixer"]


# --- ViT --------------------------------------------------------------------------------------


def test_batch_first_input_to_a_sequence_first_attention_mixes_the_samples() -> None:
    torch.manual_seed(0)
    model = ViT(Bugs(seq_first_attention=True), pool="avg").eval()
    found = batch_leaks(model, _image_inputs(16)())
    assert {finding.layer for finding in found} == {f"encoder.{index}.self_attention" for index in range(4)}
    assert all("without batch_first=True" in (finding.note or "") for finding in found)


def test_with_a_class_token_the_same_bug_leaves_the_output_blind_to_the_image() -> None:
    """Attention along the batch, read at the class token's column: every sample's output is
    computed from class tokens alone. The check cannot see a leak, and says the output does not
    depend on the input rather than pass."""
    model = _model(CASES["vit"], Bugs(seq_first_attention=True)).eval()
    (finding,) = batch_leaks(model, _image_inputs(16)())
    assert (finding.layer_type, finding.statistic) == ("ViT", "unseen")


def test_weights_initialised_too_large_explode_and_the_first_layer_is_named() -> None:
    model = _model(CASES["vit"], Bugs(init_gain=30.0)).train()
    with ActivationStats(model) as stats:
        model(torch.randn(4, 3, 16, 16))
    exploding = [finding.layer for finding in stats.findings(std=STD, exclude="head")]
    assert exploding and exploding[0].startswith("encoder.0.mlp")
