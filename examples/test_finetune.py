"""Example suite: fine-tuning a pretrained backbone under a new head, in mixed precision.

Transfer learning fails quietly: a backbone meant to be frozen keeps training (or its
BatchNorm statistics drift in train mode), the new head gets no gradient, bf16 activations
overflow, and a refactor of the backbone stops the pretrained checkpoint from loading. These
tests pin each of those down; the committed layer table shows which layers train (its
"Trainable #" column appears as soon as some parameters are frozen), and the committed state
dict format is what checkpoints saved from this model hold.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pytest_modelhooks import check_loads, state_dict_spec


def backbone(width: int = 16) -> nn.Sequential:
    """Stands in for a pretrained feature extractor: where weights would be loaded, its
    BatchNorm statistics are calibrated on a few batches (fresh ones would be mean 0, var 1)."""
    layers: list[nn.Module] = []
    channels = 3
    for stage in range(3):
        out = width * 2**stage
        conv = nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False)
        layers += [conv, nn.BatchNorm2d(out), nn.ReLU()]
        channels = out
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        for _ in range(5):
            net(torch.randn(32, 3, 32, 32))
    return net.eval()


class FineTuner(nn.Module):
    """A frozen backbone and a new classification head."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.backbone = backbone()
        self.head = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, num_classes))
        self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> FineTuner:
        super().train(mode)
        self.backbone.eval()  # frozen means its BatchNorm statistics stay put too
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@pytest.fixture
def model() -> FineTuner:
    torch.manual_seed(0)
    return FineTuner()


def test_layer_table_shows_what_trains(model, model_summary, model_snapshot):
    summary = model_summary(model, input_size=(1, 3, 32, 32))
    head_params = sum(p.numel() for p in model.head.parameters())
    assert summary.trainable_params == head_params
    assert summary["backbone"].trainable_params == 0
    assert summary == model_snapshot


def test_only_the_head_trains_and_the_backbone_stays_put(model, gradient_stats, modelhooks_device):
    device = modelhooks_device
    frozen = {name: tensor.clone() for name, tensor in model.backbone.state_dict().items()}
    with gradient_stats(model) as grads:
        # after the move to the device; only what trains
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.train()
        for _ in range(3):
            batch = torch.randn(8, 3, 32, 32, device=device)
            labels = torch.randint(0, 5, (8,), device=device)
            nn.functional.cross_entropy(model(batch), labels).backward()
            optimizer.step()
            optimizer.zero_grad()
    # only trainable parameters are tracked: the head's, and each of them got a gradient
    assert {stats.name for stats in grads} == {"head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"}
    # bounded gradients, and every one of them moved by the optimizer (a parameter left out of
    # its param groups would be named)
    grads.check(max_norm=10.0, min_norm=1e-6, require_update=True)
    # weights and BatchNorm running statistics unchanged after three training steps
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor.cpu(), frozen[name]), f"backbone.{name} changed"  # (from the GPU too)


# random images pool into small features (16 positions averaged): a low std floor
@pytest.mark.modelhooks(std=(0.01, 10.0), max_near_zero=0.9)
def test_bf16_activations_stay_healthy(model, activation_stats, modelhooks_device):
    device = modelhooks_device
    with activation_stats(model, modules="leaves") as stats, torch.autocast(device.type, torch.bfloat16):
        model.train()
        logits = model(torch.randn(16, 3, 32, 32, device=device))
        logits.float().pow(2).mean().backward()
    assert logits.dtype == torch.bfloat16
    # bf16 activations are reduced in float32; a NaN or infinity would be named here too
    stats.check()


def test_the_pretrained_checkpoint_still_loads(model, tmp_path):
    # a renamed, resized or re-typed layer in the backbone fails here, in load_state_dict's
    # words, with the rename suggested; a .safetensors file or a stored spec works as well
    path = tmp_path / "backbone.pt"
    torch.save(backbone().state_dict(), path)
    check_loads(model.backbone, path)


def test_the_checkpoint_format_is_stable(model, model_snapshot):
    # every key with its kind, shape, dtype and tie: a change reads as what loading an old
    # checkpoint would meet (missing, unexpected, shape...)
    assert state_dict_spec(model) == model_snapshot
