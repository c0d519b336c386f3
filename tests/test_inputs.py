"""The input a model expects: in_channels and dummy batches, checked against the layers that read them."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from pytest_modelhooks import (
    LayerError,
    dummy_batch,
    in_channels,
    input_spec,
    model_sizes,
    model_summary,
)
from pytest_modelhooks.inputs import declared_size
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


class _Patches(nn.Module):
    """A vision transformer's stem in small: 4x4 patches, positions for one image size only."""

    def __init__(self, side: int = 32) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, stride=4)
        self.pos = nn.Parameter(torch.zeros(1, (side // 4) ** 2, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos


def _declaring(**attributes: Any) -> nn.Module:
    model = _Patches()
    for name, value in attributes.items():
        object.__setattr__(model, name, value)  # (a plain attribute, as the libraries set them)
    return model


class _Config:
    image_size = 32


class _StrictEmbed(nn.Module):
    def __init__(self, strict: bool) -> None:
        super().__init__()
        self.img_size = (32, 48)
        self.strict_img_size = strict


@pytest.mark.parametrize(
    ("attributes", "declared"),
    [
        ({"image_size": 32}, ((32, 32), "the size its image_size gives")),  # torchvision
        ({"img_size": [32, 48]}, ((32, 48), "the size its img_size gives")),
        (  # timm
            {"pretrained_cfg": {"input_size": (3, 40, 40), "fixed_input_size": True}},
            ((40, 40), "the size its pretrained_cfg input_size gives"),
        ),
        ({"pretrained_cfg": {"input_size": (3, 40, 40), "fixed_input_size": False}}, None),
        ({"config": _Config()}, ((32, 32), "the size its config.image_size gives")),  # transformers
        ({"image_size": True}, None),  # not a size
        ({"image_size": -3}, None),
        ({"image_size": (32, 32, 32)}, None),  # a 3-d size for a 2-d image
        ({"image_size": "224"}, None),
        ({}, None),
    ],
)
def test_the_size_a_model_declares(attributes: dict[str, Any], declared: Any) -> None:
    model = _declaring(**attributes)
    assert declared_size(model, 2) == declared
    expected = declared[0] if declared else (64, 64)
    assert input_spec(model).default_size == expected
    assert dummy_batch(model).shape == (1, 3, *expected)
    assert input_spec(model).size_from == (declared[1] if declared else "")


def test_a_strict_patch_embedding_declares_its_size_and_a_loose_one_does_not() -> None:
    model = _Patches()
    model.patch_embed = _StrictEmbed(strict=True)
    assert declared_size(model, 2) == ((32, 48), "the size its patch_embed.img_size gives")
    model.patch_embed = _StrictEmbed(strict=False)  # (timm's dynamic_img_size: any size works)
    assert declared_size(model, 2) is None


def test_a_submodule_named_config_is_no_declaration() -> None:
    model = _Patches()
    model.config = nn.Linear(2, 2)
    assert declared_size(model, 2) is None
    assert declared_size(_declaring(image_size=32), None) is None  # a layer with no spatial dims


def test_a_declared_size_applies_to_images_only() -> None:
    tagger = zoo.LSTMTagger()
    object.__setattr__(tagger, "image_size", 32)
    assert dummy_batch(tagger).shape == (1, 8) and input_spec(tagger).size_from == ""


def test_summary_and_sizes_of_a_vision_transformer_take_its_declared_size() -> None:
    model = _declaring(image_size=32)
    assert model_summary(model).input_shapes == (1, 3, 32, 32)
    assert model_sizes(model)["proj"] == (1, 8, 8, 8)
    with pytest.raises(LayerError):
        model_summary(_Patches())  # 64x64 gives 256 patches for 64 positions: declared, it runs
