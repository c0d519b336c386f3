"""Example suite: a U-Net whose decoder concatenates the encoder's skip connections.

The decoder's channel counts are derived from ``model_sizes`` of the encoder, as a U-Net
builder would; the property test finds the input sizes the network rejects.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from torch import nn

from pytest_modelhooks import LayerError, check_loss_at_init
from pytest_modelhooks.strategies import input_sizes


def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )  # fmt: skip


class UNet(nn.Module):
    def __init__(self, channels: int = 3, classes: int = 2, width: int = 8, depth: int = 3) -> None:
        super().__init__()
        widths = [width * 2**level for level in range(depth + 1)]
        self.down = nn.ModuleList([double_conv(channels, widths[0])])
        self.down.extend(double_conv(widths[level], widths[level + 1]) for level in range(depth))
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[level + 1], widths[level], 2, 2) for level in reversed(range(depth))
        )
        self.merge = nn.ModuleList(
            double_conv(2 * widths[level], widths[level]) for level in reversed(range(depth))
        )
        self.out = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for index, block in enumerate(self.down):
            x = block(x if index == 0 else self.pool(x))
            skips.append(x)
        skips.pop()
        for up, merge in zip(self.up, self.merge, strict=True):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return self.out(x)


@pytest.fixture
def unet() -> UNet:
    torch.manual_seed(0)
    return UNet()


def test_skip_connections_match_the_upsampled_maps(unet, model_sizes):
    sizes = model_sizes(unet, (64, 64), modules=["down.0", "down.1", "down.2", "up.0", "up.1", "up.2", "out"])
    assert sizes["up.0"] == sizes["down.2"] == (1, 32, 16, 16)
    assert sizes["up.1"] == sizes["down.1"] == (1, 16, 32, 32)
    assert sizes["up.2"] == sizes["down.0"] == (1, 8, 64, 64)
    assert sizes["out"] == (1, 2, 64, 64)  # one logit map per class, full resolution


def test_layer_table(unet, model_summary, model_snapshot):
    assert model_summary(unet, input_size=(1, 3, 64, 64), depth=2) == model_snapshot


def test_odd_sizes_fail_with_the_layer_named(unet, model_sizes):
    with pytest.raises(LayerError, match=r"model UNet got input|layer 'merge\.\d'"):
        model_sizes(unet, (60, 60))  # 60 -> 30 -> 15 -> 7: the upsampled 14 does not meet 15


@settings(max_examples=20, deadline=None)
@given(size=input_sizes(min_side=8, max_side=128, multiple_of=8))
def test_every_multiple_of_eight_works(model_sizes, size):
    sizes = model_sizes(UNet(), size[2:], modules=["out"])
    assert sizes["out"] == (1, 2, *size[2:])


@pytest.mark.modelhooks(std=(0.05, 5.0))
def test_training_step_is_healthy(unet, activation_stats, gradient_stats, modelhooks_device):
    batch = torch.randn(2, 3, 32, 32, device=modelhooks_device)
    masks = torch.randint(0, 2, (2, 32, 32), device=modelhooks_device)
    with activation_stats(unet) as stats, gradient_stats(unet) as grads:
        logits = unet(batch)
        nn.functional.cross_entropy(logits, masks).backward()
    stats.check()
    grads.check()


def test_starts_at_chance_per_pixel(unet):
    # (batch, classes, height, width) logits against (batch, height, width) masks: every pixel
    # at log(2) before training
    check_loss_at_init(unet, (torch.randn(4, 3, 32, 32), torch.randint(0, 2, (4, 32, 32))))
