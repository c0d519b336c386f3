"""Example suite: a small image classifier. Copy it next to your own model.

It checks the architecture, not the training: every stage's output shape, the parameter budget
and the layer table (a committed snapshot), healthy activations and gradients, a loss at init
at chance and one batch memorised, that any input size the model claims to take gives one logit
per class, and that it compiles whole and exports for inference with a dynamic batch.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from torch import nn

from pytest_modelhooks import (
    check_batch_independence,
    check_deterministic,
    check_exportable,
    check_loss_at_init,
    check_overfits,
)
from pytest_modelhooks.strategies import input_sizes


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        )


class Classifier(nn.Module):
    """Four stages: each halves the resolution and doubles the channels."""

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


def test_each_stage_halves_the_resolution_and_doubles_the_channels(model, model_sizes):
    sizes = model_sizes(model, (64, 64), modules=["stem", "stages.0", "stages.1", "stages.2", "head"])
    assert sizes["stem"] == (1, 16, 64, 64)
    assert sizes["stages.0"] == (1, 32, 32, 32)
    assert sizes["stages.1"] == (1, 64, 16, 16)
    assert sizes["stages.2"] == (1, 128, 8, 8)
    assert sizes[-1] == (1, 10)


def test_parameter_budget_and_layer_table(model, model_summary, model_snapshot):
    summary = model_summary(model, input_size=(1, 3, 64, 64))
    assert summary.total_params < 200_000, str(summary)
    assert summary == model_snapshot  # __snapshots__/test_cnn_classifier/...; --snapshot-update


@pytest.mark.modelhooks(std=(0.05, 5.0), max_dead=0.3, max_grad_norm=50.0)
def test_activations_and_gradients_stay_healthy(model, activation_stats, gradient_stats, modelhooks_device):
    device = modelhooks_device  # --modelhooks-device=cuda runs the same test on the GPU
    with activation_stats(model) as stats, gradient_stats(model) as grads:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)  # after the move to the device
        for _ in range(3):
            batch = torch.randn(16, 3, 32, 32, device=device)
            loss = nn.functional.cross_entropy(model(batch), torch.randint(0, 10, (16,), device=device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    stats.check()  # bounds from the marker above
    grads.check()  # every parameter got a finite gradient under max_grad_norm, and was updated
    # (with --modelhooks-plots DIR, a failing check also writes the layers' or gradients' picture)


def test_starts_at_chance_and_memorises_a_batch(model):
    # the training recipe's first checks: the untrained loss is log(10), and a copy trained on
    # one batch memorises it (a head initialised too large, a frozen stage, a dead stack or a
    # zero_grad() between backward() and step() would each be named)
    batch = (torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    check_loss_at_init(model, batch)
    check_overfits(model, batch, steps=200, lr=1e-2)


def test_each_prediction_depends_on_its_own_image_only_and_not_on_chance(model, modelhooks_device):
    # in eval mode BatchNorm uses its running statistics and Dropout is off: a sample must not
    # see the others, and two forwards of one batch must agree
    batch = torch.randn(3, 3, 32, 32, device=modelhooks_device)
    check_batch_independence(model.to(modelhooks_device), batch)
    check_deterministic(model, batch)


def test_intermediate_outputs_can_be_inspected(model, hooked_model, modelhooks_device):
    hooks = hooked_model(model, modules=["stem", "stages.2"])
    model.eval()(torch.randn(2, 3, 32, 32, device=modelhooks_device))
    stem_out, last_stage = hooks["stem"].stored, hooks["stages.2"].stored
    assert stem_out.min() >= 0  # after the ReLU
    assert last_stage.shape == (2, 128, 4, 4)
    # the fixture removes the hooks at teardown, also when the test fails


@settings(max_examples=20, deadline=None)
@given(size=input_sizes(min_side=8, max_side=96))
def test_any_input_size_gives_one_logit_per_class(model_sizes, size):
    sizes = model_sizes(Classifier(), size[2:], modules=["head"])
    assert sizes["head"] == (1, 10)


def test_compiles_whole_and_keeps_one_graph_over_batch_sizes(model, model_compiles):
    # a graph break (an .item(), a Python branch on a value) or a recompilation fails, named
    batches = [torch.randn(size, 3, 32, 32) for size in (5, 8)]
    model_compiles(model, torch.randn(2, 3, 32, 32), more_inputs=batches, dynamic="batch", max_recompiles=0)


def test_exports_for_inference_with_a_dynamic_batch(model):
    # the exported program is run beside eager at batch 2 and at 4, output by output
    check_exportable(model.eval(), torch.randn(2, 3, 32, 32), dynamic_shapes="batch")
