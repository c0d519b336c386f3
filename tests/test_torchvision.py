"""torchvision's models, built from code with random weights: every one summarises with exact
totals and runs afterwards exactly as before; the documented health bounds hold on the
classifiers at init. Skipped where torchvision is not importable (see the README's
"Developing" section for an environment that has it)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

tv = pytest.importorskip("torchvision")
models = tv.models

from pytest_modelhooks import ActivationStats, GradientStats, HealthError, model_summary  # noqa: E402

# the documented bounds (docs/health.md)
STD, MAX_DEAD, MAX_GRAD_NORM = (0.001, 50.0), 0.8, 1e5
# sides a model needs: fixed-size transformers take 224 only, Inception (with its auxiliary head) 299
SIDE = {"inception_v3": 299}
FIXED_224 = ("vit_", "swin_", "maxvit_")
# the largest configurations: minutes each on a CPU, nothing their smaller siblings lack
TOO_BIG = {"vit_h_14", "regnet_y_128gf", "vit_l_16", "vit_l_32", "regnet_y_32gf", "regnet_y_16gf"}


def _names(module: Any) -> list[str]:
    return sorted(name for name in models.list_models(module=module) if name not in TOO_BIG)


def _side(name: str) -> int:
    return 224 if name.startswith(FIXED_224) else SIDE.get(name, 64)


def _output_leaves(output: Any) -> list[torch.Tensor]:
    from pytest_modelhooks._tree import tensor_leaves

    return [tensor for _, tensor in tensor_leaves(output)]


def _same_after_summary(model: nn.Module, *inputs: Any) -> None:
    """A summary (engine auto: meta, fake, then real) leaves the model computing what it did."""
    model.eval()
    with torch.no_grad():
        before = _output_leaves(model(*inputs))
    summary = model_summary(model, input_data=inputs)
    assert summary.total_params == sum(param.numel() for param in model.parameters())
    with torch.no_grad():
        after = _output_leaves(model(*inputs))
    assert len(before) == len(after)
    for one, other in zip(before, after, strict=True):
        assert type(other) is torch.Tensor and other.device.type == "cpu"
        torch.testing.assert_close(other, one)


@pytest.mark.parametrize("name", _names(models))
def test_classifiers_summarise_exactly_and_hold_the_documented_bounds(name: str) -> None:
    torch.manual_seed(0)
    model = models.get_model(name, weights=None)
    side = _side(name)
    _same_after_summary(model, torch.randn(1, 3, side, side))
    model.train()
    with ActivationStats(model) as stats:  # ViT's zero head: zero-initialised, not vanishing
        model(torch.randn(16, 3, side, side))
    found = stats.findings(std=STD, max_dead=MAX_DEAD)
    assert not found, "\n".join(map(str, found))
    _training_steps_hold_the_gradient_bound(model, side)


def _training_steps_hold_the_gradient_bound(model: nn.Module, side: int) -> None:
    """Two AdamW steps from init (the second sees what the first changed): every parameter gets
    a finite gradient below the documented bound and is updated."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = 4 if side > 64 else 16
    images, labels = torch.randn(batch, 3, side, side), torch.randint(0, 1000, (batch,))
    with GradientStats(model) as grads:
        for _ in range(2):
            output = model(images)
            # GoogLeNet and Inception return their auxiliary logits in train mode: train them too
            logits = [output] if isinstance(output, torch.Tensor) else [o for o in output if o is not None]
            torch.stack([nn.functional.cross_entropy(one, labels) for one in logits]).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    grads.check(max_norm=MAX_GRAD_NORM)


@pytest.mark.parametrize("name", _names(models.detection))
def test_detectors_summarise_and_are_left_working(name: str) -> None:
    torch.manual_seed(0)
    try:  # small images keep the real forward quick (the transform resizes to min_size)
        model = models.get_model(name, weights=None, weights_backbone=None, min_size=128, max_size=128)
    except TypeError:  # SSD's sizes are fixed
        model = models.get_model(name, weights=None, weights_backbone=None)
    _same_after_summary(model, [torch.rand(3, 128, 128)])


@pytest.mark.parametrize("name", _names(models.segmentation))
def test_segmentation_models_summarise_and_are_left_working(name: str) -> None:
    torch.manual_seed(0)
    model = models.get_model(name, weights=None, weights_backbone=None)
    _same_after_summary(model, torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("name", _names(models.video))
def test_video_models_summarise_and_are_left_working(name: str) -> None:
    torch.manual_seed(0)
    model = models.get_model(name, weights=None)
    frames, side = (16, 224) if name.startswith(("mvit", "s3d", "swin3d")) else (4, 64)
    _same_after_summary(model, torch.randn(1, 3, frames, side, side))


@pytest.mark.parametrize("name", _names(models.optical_flow))
def test_optical_flow_models_summarise_and_are_left_working(name: str) -> None:
    torch.manual_seed(0)
    model = models.get_model(name, weights=None)
    _same_after_summary(model, torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128))


# one of each family: the fake trace's memory report equals a real step's, field by field
MEMORY = [
    "resnet18",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "convnext_tiny",
    "densenet121",
    "vit_b_32",
    "swin_t",
]


@pytest.mark.parametrize("name", MEMORY)
def test_the_memory_of_a_training_step_is_what_a_real_step_allocates(name: str) -> None:
    from pytest_modelhooks import model_memory

    torch.manual_seed(0)
    model = models.get_model(name, weights=None)
    side = _side(name)
    batch = torch.randn(2, 3, side, side)
    assert model_memory(model, batch).to_dict() == model_memory(model, batch, engine="real").to_dict()


LOSS_AT_INIT = [
    "resnet18",
    "resnet50",
    "vit_b_16",
    "convnext_tiny",
    "efficientnet_b0",
    "mobilenet_v3_small",
    "densenet121",
    "swin_t",
    "regnet_y_400mf",
    "vgg11",
    "squeezenet1_0",
    "shufflenet_v2_x1_0",
]


@pytest.mark.parametrize("name", LOSS_AT_INIT)
def test_the_loss_at_init_is_chance_with_the_default_tolerance(name: str) -> None:
    from pytest_modelhooks.training import check_loss_at_init

    torch.manual_seed(0)
    model = models.get_model(name)
    images, labels = torch.randn(4, 3, 224, 224), torch.randint(0, 1000, (4,))
    loss = check_loss_at_init(model, (images, labels))  # training mode, as the first step runs
    assert math.isfinite(loss)


# BatchNorm under in-place ReLU and Hardswish, residual `+=`, concatenations, SiLU blocks,
# layer-scaled blocks, shifted windows, attention
HELD = ["resnet18", "mobilenet_v3_small", "densenet121", "efficientnet_b0", "convnext_tiny", "swin_t"]


@pytest.mark.parametrize("name", HELD)
def test_the_device_path_holding_outputs_gives_the_numbers_of_each_hook(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU outputs are held to the batch's end and gradients to the backward's end (forced
    here on the CPU): every statistic, dead fraction and gradient row of two training steps is
    what reducing each tensor in its hook gives."""
    from pytest_modelhooks.stats import STATISTICS, activations, gradients, reduce

    torch.manual_seed(0)
    model = models.get_model(name, weights=None, num_classes=10)
    side = _side(name)
    batches = [(torch.randn(2, 3, side, side), torch.randint(0, 10, (2,))) for _ in range(2)]
    monkeypatch.setattr(activations, "on_host", lambda x: False)

    def steps(**options: Any) -> tuple[ActivationStats, GradientStats]:
        torch.manual_seed(1)  # the same dropout and stochastic-depth draws both times
        with ActivationStats(model, modules="all", **options) as stats, GradientStats(model) as grads:
            for x, y in batches:
                model.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
        return stats, grads

    monkeypatch.setattr(gradients, "on_host", lambda grad: False)
    held, held_grads = steps()
    monkeypatch.setattr(gradients, "on_host", lambda grad: True)
    monkeypatch.setattr(gradients, "grad_on_host", reduce.grad_on_device)
    in_hooks, hook_grads = steps(max_held=0)
    assert held._holdable
    for one, other in zip(in_hooks, held, strict=True):
        for statistic in STATISTICS:
            torch.testing.assert_close(other[statistic], one[statistic], rtol=1e-6, atol=1e-7, equal_nan=True)
        assert (other.dead, other.channels) == (one.dead, one.channels), one.name
        assert torch.equal(other.ran, one.ran), one.name
    torch.testing.assert_close(held_grads._gather(), hook_grads._gather(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", _names(models) + _names(models.video))
def test_every_classifier_and_video_model_runs_with_no_size_given(name: str) -> None:
    # the size a ViT declares, or the first larger standard size the forward accepts; a real
    # forward on a batch of that shape gives the shapes the summary traced
    torch.manual_seed(0)
    model = models.get_model(name, weights=None).eval()
    summary = model_summary(model)
    with torch.no_grad():
        real = model(torch.randn(*summary.input_shapes))
    assert summary.output_shapes == real.shape


def test_inceptions_head_drawn_at_std_0_1_starts_above_chance_and_is_named() -> None:
    from pytest_modelhooks.training import check_loss_at_init

    torch.manual_seed(0)
    model = models.get_model("inception_v3", init_weights=True)
    images, labels = torch.randn(4, 3, 299, 299), torch.randint(0, 1000, (4,))
    head = r"from layer fc \(Linear, weight std 0\.0999: 7\.8\dx PyTorch's default for fan_in 2048\)"
    with pytest.raises(HealthError, match=head):
        check_loss_at_init(model, (images, labels))
    assert math.isfinite(check_loss_at_init(model, (images, labels), rtol=0.5))
    with torch.no_grad():
        nn.init.normal_(model.fc.weight, std=0.01)
    assert math.isfinite(check_loss_at_init(model, (images, labels)))
