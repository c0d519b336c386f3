"""The input a model expects: in_channels and dummy batches, checked against the layers that read them."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from pytest_modelhooks import (
    dummy_batch,
    in_channels,
    model_summary,
)
from tests import zoo


@pytest.mark.parametrize(
    ("name", "channels"),
    [
        ("resnetish", 3),
        ("mlp", 20),
        ("conv1d", 4),
        ("conv3d", 2),
        ("depthwise", 6),
        ("gru", 10),
        ("lstm_tagger", 50),
        ("transformer", 32),
        ("unet", 3),
        ("tied_lm", 100),
        ("with_parameter", 7),
    ],
)
def test_in_channels_reads_the_first_layer(name: str, channels: int) -> None:
    model, _ = zoo.build(name)
    assert in_channels(model) == channels


def test_in_channels_names_an_unknown_first_layer() -> None:
    model = nn.Sequential(nn.ReLU(), nn.Bilinear(3, 3, 2))
    with pytest.raises(ValueError, match=r"first layer with parameters, layer '1' \(Bilinear\), is not a"):
        in_channels(model)
    with pytest.raises(
        ValueError, match=r"has no layer with parameters; give the input explicitly \(model_sizes"
    ):
        in_channels(zoo.no_params())
    with pytest.raises(ValueError, match=r"model_summary\(input_size=\.\.\. or input_data=\.\.\.\)"):
        model_summary(nn.Sequential(nn.ReLU(), nn.Bilinear(3, 3, 2)))


@pytest.mark.parametrize(
    ("name", "size", "shape"),
    [
        ("resnetish", None, (1, 3, 64, 64)),
        ("resnetish", (20, 24), (1, 3, 20, 24)),
        ("conv1d", None, (1, 4, 64)),
        ("conv3d", (4, 5, 6), (1, 2, 4, 5, 6)),
        ("mlp", None, (1, 20)),
        ("mlp", (7,), (1, 7, 20)),
        ("gru", (5,), (1, 5, 10)),
        ("transformer", None, (1, 8, 32)),
        ("lstm_tagger", (12,), (1, 12)),
    ],
)
def test_dummy_batch_shapes(name: str, size: Any, shape: tuple[int, ...]) -> None:
    model, _ = zoo.build(name)
    assert dummy_batch(model, size).shape == shape


def test_dummy_batch_follows_dtype_and_leaves_the_global_rng_alone() -> None:
    model = zoo.ResNetish().double()
    state = torch.get_rng_state()
    first = dummy_batch(model, (8, 8))
    assert torch.equal(torch.get_rng_state(), state)
    assert first.dtype == torch.float64 and not first.requires_grad
    assert torch.equal(first, dummy_batch(model, (8, 8)))  # reproducible
    tokens = dummy_batch(zoo.LSTMTagger(), (9,))
    assert tokens.dtype == torch.long and int(tokens.min()) >= 0 and int(tokens.max()) < 50


def test_dummy_batch_sequence_layout_follows_batch_first() -> None:
    model = nn.Sequential(nn.LSTM(3, 4))  # batch_first=False: (L, B, F)
    assert dummy_batch(model, (6,)).shape == (6, 1, 3)
