"""An example suite for a small image classifier: copy it next to your own model.

It checks the architecture, not the training: every stage's output shape, the parameter budget,
that no hook is left behind, and that shapes hold for any input size the model claims to take.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pytest_modelhooks import count_hooks, hook_outputs, model_sizes, model_summary, num_features_model


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        )


class Classifier(nn.Module):
    """A four-stage CNN: each stage halves the resolution and doubles the channels."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = ConvBlock(3, width)
        self.stages = nn.Sequential(
            ConvBlock(width, 2 * width, stride=2),
            ConvBlock(2 * width, 4 * width, stride=2),
            ConvBlock(4 * width, 8 * width, stride=2),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(8 * width, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


@pytest.fixture
def model() -> Classifier:
    torch.manual_seed(0)
    return Classifier()


def test_each_stage_halves_the_resolution_and_doubles_the_channels(model: Classifier) -> None:
    sizes = model_sizes(model, (64, 64), modules=["stem", "stages.0", "stages.1", "stages.2", "head"])
    assert sizes["stem"] == (1, 16, 64, 64)
    assert sizes["stages.0"] == (1, 32, 32, 32)
    assert sizes["stages.1"] == (1, 64, 16, 16)
    assert sizes["stages.2"] == (1, 128, 8, 8)
    assert sizes[-1] == (1, 10)
    assert sizes.engine == "meta"  # no compute on the weights


def test_the_body_feeds_the_head_the_features_it_expects(model: Classifier) -> None:
    body = nn.Sequential(model.stem, model.stages)
    assert num_features_model(body) == model.head[-1].in_features


def test_parameter_budget(model: Classifier) -> None:
    summary = model_summary(model, input_size=(1, 3, 64, 64))
    assert summary.total_params == sum(p.numel() for p in model.parameters())
    assert summary.total_params < 200_000, str(summary)
    assert summary["head.3"].params == 128 * 10 + 10


def test_intermediate_activations_can_be_inspected_without_leaking_hooks(model: Classifier) -> None:
    with hook_outputs([model.stem, model.stages[-1]]) as hooks:
        model.eval()(torch.randn(2, 3, 32, 32))
    stem_out, last_stage = hooks.stored
    assert stem_out.min() >= 0  # after the ReLU
    assert last_stage.shape == (2, 128, 4, 4)
    assert count_hooks(model) == 0


@settings(max_examples=25, deadline=None)
@given(side=st.integers(min_value=8, max_value=96))
def test_any_input_size_gives_one_logit_per_class(side: int) -> None:
    sizes = model_sizes(Classifier(), (side, side), modules=["head"])
    assert sizes["head"] == (1, 10)
