"""Example suite: a bidirectional LSTM sequence tagger."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from torch import nn

from pytest_modelhooks.strategies import token_batches

VOCAB, TAGS = 300, 7


class Tagger(nn.Module):
    def __init__(self, dim: int = 32, hidden: int = 48) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim, padding_idx=0)
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, batch_first=True, bidirectional=True, dropout=0.1)
        self.tag = nn.Linear(2 * hidden, TAGS)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(ids))
        return self.tag(out)


@pytest.fixture
def tagger() -> Tagger:
    torch.manual_seed(0)
    return Tagger()


def test_lstm_outputs_and_states(tagger, model_sizes):
    sizes = model_sizes(tagger, input=torch.zeros(3, 11, dtype=torch.long))
    out, (h, c) = sizes["lstm"]
    assert out == (3, 11, 96)  # both directions
    assert h == c == (4, 3, 48)  # 2 layers x 2 directions
    assert sizes["tag"] == (3, 11, TAGS)


def test_layer_table(tagger, model_summary, model_snapshot):
    assert model_summary(tagger, input_size=(2, 12)) == model_snapshot


@settings(max_examples=20, deadline=None)
@given(ids=token_batches(VOCAB, max_length=40))
def test_one_tag_distribution_per_token(model_sizes, ids):
    assert model_sizes(Tagger(), input=ids, modules=["tag"])["tag"] == (*ids.shape, TAGS)


@pytest.mark.modelhooks(std=(0.01, 5.0))
def test_gradients_reach_every_weight(tagger, activation_stats, gradient_stats, modelhooks_device):
    ids = torch.randint(1, VOCAB, (8, 20), device=modelhooks_device)
    tags = torch.randint(0, TAGS, (160,), device=modelhooks_device)
    with activation_stats(tagger, modules="all") as stats, gradient_stats(tagger) as grads:
        logits = tagger(ids)
        nn.functional.cross_entropy(logits.reshape(-1, TAGS), tags).backward()
    assert "lstm[1][0]" in stats.series_names  # the (h, c) states get their own series
    stats.check()
    grads.check(min_norm=1e-7)
