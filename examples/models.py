"""Model factories for the command line (``modelhooks summary examples.models:classifier ...``),
as a project of yours would keep them: functions that build an ``nn.Module``."""

from __future__ import annotations

import torch
from torch import nn


def classifier(num_classes: int = 10, width: int = 16) -> nn.Module:
    """A small Conv-BN-ReLU image classifier."""

    def block(cin: int, cout: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(
        block(3, width, 1),
        block(width, 2 * width, 2),
        block(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, num_classes),
    )


def exploding() -> nn.Module:
    """An MLP initialised five times too large: each layer multiplies the std by ~3."""
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(4)])
    with torch.no_grad():
        for layer in model:
            layer.weight.mul_(5.0)
    return model


class LanguageModel(nn.Module):
    """A one-block decoder: embedding, attention (causally masked unless ``causal=False``), head."""

    def __init__(self, vocab: int = 100, dim: int = 32, causal: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.head = nn.Linear(dim, vocab)
        self.causal = causal

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        n = tokens.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool, device=tokens.device).triu(1) if self.causal else None
        return self.head(x + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0])


def language_model() -> nn.Module:
    return LanguageModel()


def language_model_without_mask() -> nn.Module:
    """The bug the causal check finds: attention that sees later positions."""
    return LanguageModel(causal=False)
