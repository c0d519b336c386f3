"""A zoo of small models written from scratch (no torchvision), one per architecture shape the
library must handle. Each factory returns a fresh model and an input it accepts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn


class BasicBlock(nn.Module):
    """A ResNet basic block: two 3x3 convs, an identity or projected shortcut, in-place ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNetish(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5)
    )


def conv1d_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(4, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(), nn.MaxPool1d(2), nn.Conv1d(8, 16, 3)
    )


def conv3d_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 8, 3, stride=2))


def depthwise_first() -> nn.Sequential:
    # A grouped (depthwise) first layer: weight.shape[1] is 1, in_channels is 6.
    return nn.Sequential(nn.Conv2d(6, 6, 3, groups=6), nn.Conv2d(6, 12, 1), nn.ReLU())


class GRUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(10, 20, num_layers=2, batch_first=True)
        self.head = nn.Linear(20, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        return self.head(out[:, -1])


class LSTMTagger(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 16, tags: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, 32, batch_first=True, bidirectional=True)
        self.tag = nn.Linear(64, tags)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.tag(out)


def transformer_encoder() -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True, dropout=0.1)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


class UNet(nn.Module):
    """A two-level U-Net whose decoder concatenates the encoder's skip connections."""

    def __init__(self, channels: int = 3, width: int = 8, classes: int = 2) -> None:
        super().__init__()

        def double(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU()
            )

        self.down1 = double(channels, width)
        self.down2 = double(width, 2 * width)
        self.pool = nn.MaxPool2d(2)
        self.bottom = double(2 * width, 4 * width)
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.dec2 = double(4 * width, 2 * width)
        self.up1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec1 = double(2 * width, width)
        self.out = nn.Conv2d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip1 = self.down1(x)
        skip2 = self.down2(self.pool(skip1))
        x = self.bottom(self.pool(skip2))
        x = self.dec2(torch.cat([self.up2(x), skip2], dim=1))
        x = self.dec1(torch.cat([self.up1(x), skip1], dim=1))
        return self.out(x)


class TiedLM(nn.Module):
    """Embedding and output head share one weight (counted once)."""

    def __init__(self, vocab: int = 100, dim: int = 24) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.block = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(tokens)))


class Reused(nn.Module):
    """The same Linear called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.shared = nn.Linear(8, 8)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(self.act(self.shared(self.inp(x))))


class Pair(NamedTuple):
    low: torch.Tensor
    high: torch.Tensor


@dataclass
class Output:
    logits: torch.Tensor
    hidden: tuple[torch.Tensor, ...]


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> Pair:
        return Pair(self.a(x), self.b(x))


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.body(x)
        return {"logits": self.head(hidden), "hidden": hidden}


class DataclassOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> Output:
        hidden = self.body(x)
        return Output(self.head(hidden), (hidden,))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Conv2d(3, 4, 3)
        self.meta = nn.Linear(5, 4)
        self.fuse = nn.Linear(8, 2)

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        pooled = self.image(image).mean(dim=(2, 3))
        return self.fuse(torch.cat([pooled, self.meta(extra)], dim=1))


class DataDependent(nn.Module):
    """Control flow that reads a value: meta and fake tensors cannot run it."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.pos = nn.Linear(4, 3)
        self.neg = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        if x.sum() > -1e9:
            return self.pos(x)
        return self.neg(x)


class WithParameter(nn.Module):
    """A container holding a loose nn.Parameter besides its children."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(7))
        self.body = nn.Sequential(nn.Linear(7, 7), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * self.scale)


class Decoder(nn.Module):
    """A LLaMA-style decoder (RMSNorm, gated MLP, tied-free head) for the scale test."""

    def __init__(self, vocab: int, dim: int, layers: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(DecoderLayer(dim, hidden, heads) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.mlp_norm = nn.RMSNorm(dim)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(batch, length, 3, self.heads, -1).unbind(2)
        attn = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.out(attn.transpose(1, 2).reshape(batch, length, dim))
        h = self.mlp_norm(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


def no_params() -> nn.Sequential:
    return nn.Sequential(nn.ReLU(), nn.Flatten())


def partly_frozen() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    model[0].weight.requires_grad_(False)
    return model


def mixed_modes() -> ResNetish:
    model = ResNetish()
    model.train()
    model.layer1.eval()  # a frozen-BN backbone stage: mixed modes must survive
    return model


# name -> (factory, example input); inputs are built lazily so each test gets fresh tensors.
ZOO: dict[str, tuple[Callable[[], nn.Module], Callable[[], Any]]] = {
    "resnetish": (ResNetish, lambda: torch.randn(2, 3, 32, 32)),
    "mlp": (mlp, lambda: torch.randn(3, 20)),
    "conv1d": (conv1d_net, lambda: torch.randn(2, 4, 32)),
    "conv3d": (conv3d_net, lambda: torch.randn(1, 2, 8, 8, 8)),
    "depthwise": (depthwise_first, lambda: torch.randn(1, 6, 10, 10)),
    "gru": (GRUNet, lambda: torch.randn(2, 7, 10)),
    "lstm_tagger": (LSTMTagger, lambda: torch.randint(0, 50, (2, 9))),
    "transformer": (transformer_encoder, lambda: torch.randn(2, 6, 32)),
    "unet": (UNet, lambda: torch.randn(1, 3, 16, 16)),
    "tied_lm": (TiedLM, lambda: torch.randint(0, 100, (2, 5))),
    "reused": (Reused, lambda: torch.randn(2, 6)),
    "tuple_out": (TupleOut, lambda: torch.randn(2, 4)),
    "dict_out": (DictOut, lambda: torch.randn(2, 4)),
    "dataclass_out": (DataclassOut, lambda: torch.randn(2, 4)),
    "two_inputs": (TwoInputs, lambda: (torch.randn(2, 3, 8, 8), torch.randn(2, 5))),
    "data_dependent": (DataDependent, lambda: torch.randn(2, 4)),
    "with_parameter": (WithParameter, lambda: torch.randn(2, 7)),
    "no_params": (no_params, lambda: torch.randn(2, 3, 4)),
    "partly_frozen": (partly_frozen, lambda: torch.randn(2, 8)),
    "mixed_modes": (mixed_modes, lambda: torch.randn(2, 3, 16, 16)),
}


def build(name: str) -> tuple[nn.Module, Any]:
    factory, make_input = ZOO[name]
    torch.manual_seed(0)
    return factory(), make_input()
