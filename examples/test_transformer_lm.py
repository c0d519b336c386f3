"""Example suite: a small decoder-only transformer language model with a tied head."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from torch import nn

from pytest_modelhooks import check_batch_independence, check_causal, check_loss_at_init, check_overfits
from pytest_modelhooks.strategies import token_batches

VOCAB, CONTEXT = 500, 64


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, dim)
        self.positions = nn.Embedding(CONTEXT, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)
        self.head.weight = self.tokens.weight  # tied: counted once
        # nn.Embedding draws N(0, 1): tied to the head, that gives logits of std sqrt(dim) and a
        # loss at init of 43 against log(500) = 6.2; GPT-2 draws its embeddings at std 0.02
        for embedding in (self.tokens, self.positions):
            nn.init.normal_(embedding.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        mask = torch.ones(length, length, dtype=torch.bool, device=ids.device).triu(1)
        x = self.tokens(ids) + self.positions(torch.arange(length, device=ids.device))
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


@pytest.fixture
def lm() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


def test_tied_head_is_counted_once(lm, model_summary):
    summary = model_summary(lm, input_size=(1, 16))
    assert summary.total_params == sum(p.numel() for p in lm.parameters())
    assert summary["head"].params == VOCAB * 64  # the head shows the weight it uses...
    assert summary.total_params < VOCAB * 64 * 2 + 150_000  # ...but the total holds it once


def test_layer_table(lm, model_summary, model_snapshot):
    assert model_summary(lm, input_size=(1, 16), depth=2) == model_snapshot


@settings(max_examples=20, deadline=None)
@given(ids=token_batches(VOCAB, max_length=CONTEXT))
def test_one_distribution_per_position(model_sizes, ids):
    sizes = model_sizes(TinyLM(), input=ids, modules=["blocks.0", "head"])
    assert sizes["head"] == (*ids.shape, VOCAB)
    assert sizes["blocks.0"] == (*ids.shape, 64)


def test_starts_at_chance_and_memorises_a_batch(lm):
    # next-token logits (batch, length, vocab) against (batch, length) ids: judged against
    # log(VOCAB); the N(0, 1) embedding init fails here, naming the head and its tie
    ids = torch.randint(0, VOCAB, (8, 33))
    batch = (ids[:, :-1], ids[:, 1:])
    check_loss_at_init(lm, batch)
    check_overfits(lm, batch, steps=300, lr=1e-2)  # on a copy; lm is left as it was


@pytest.mark.modelhooks(std=(0.01, 10.0), max_std_growth=10.0)
def test_training_step_is_healthy(lm, activation_stats, gradient_stats, modelhooks_device):
    ids = torch.randint(0, VOCAB, (4, 32), device=modelhooks_device)
    with activation_stats(lm, modules=nn.LayerNorm) as stats, gradient_stats(lm) as grads:
        logits = lm(ids[:, :-1])
        nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
    stats.check()
    grads.check(max_norm=100.0)
    assert grads.unused() == []


def test_no_position_sees_later_ones_and_no_sample_another(lm, modelhooks_device):
    # a mask left out (or built with triu(0) or triu(2)) fails here, naming each attention
    ids = torch.randint(0, VOCAB, (3, 12), device=modelhooks_device)
    lm.to(modelhooks_device)
    check_causal(lm, ids)
    check_batch_independence(lm, ids)


@pytest.mark.modelhooks(max_memory="64MiB")
def test_a_training_step_at_full_context_fits_the_budget(lm, model_memory):
    # traced on fake tensors: nothing runs, so this costs the same on a laptop as on a GPU box
    ids = torch.randint(0, VOCAB, (32, CONTEXT))
    report = model_memory(lm, ids, optimizer="adamw", autocast=torch.bfloat16)
    report.check()  # the marker's budget; a failure prints the report, layer by layer
    assert report["blocks.0.attn"].saved_bytes > 0  # the attention keeps its probabilities


def test_compiles_whole_and_keeps_one_graph_over_sequence_lengths(lm, model_compiles):
    # marked dynamic: a length the code turns into a Python int would recompile, and be named
    ids = torch.randint(0, VOCAB, (2, 16))
    longer = [torch.randint(0, VOCAB, (2, length)) for length in (24, CONTEXT)]
    model_compiles(lm, ids, more_inputs=longer, dynamic={"ids": 1}, max_recompiles=0)
