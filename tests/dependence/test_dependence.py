"""Batch independence and causality: leaks found with gradients, named at the layer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pytest_modelhooks import (
    HealthError,
    batch_leaks,
    causal_leaks,
    check_batch_independence,
    check_causal,
    check_deterministic,
    count_hooks,
    nondeterministic_layers,
    training_flags,
)
from tests import zoo
from tests.helpers import untouched


class Block(nn.Module):
    """A pre-norm decoder block; ``shift`` is the causal mask's diagonal (1 is right)."""

    def __init__(
        self, dim: int = 16, *, batch_first: bool = True, causal: bool = True, shift: int = 1
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=batch_first)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.causal, self.shift = causal, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        mask = torch.ones(length, length, dtype=torch.bool).triu(self.shift) if self.causal else None
        h = self.norm(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(x)


class Decoder(nn.Module):
    def __init__(self, vocab: int = 40, dim: int = 16, **block: object) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([Block(dim, **block) for _ in range(2)])  # type: ignore[arg-type]
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def tokens(batch: int = 3, length: int = 7) -> torch.Tensor:
    return torch.randint(0, 40, (batch, length), generator=torch.Generator().manual_seed(0))


def test_a_well_built_decoder_is_batch_independent_and_causal() -> None:
    torch.manual_seed(0)
    model = Decoder()
    assert batch_leaks(model, tokens()) == []
    assert causal_leaks(model, tokens()) == []
    check_batch_independence(model, tokens())
    check_causal(model, tokens())


def test_attention_without_a_mask_is_named_in_every_block_not_only_the_last() -> None:
    torch.manual_seed(0)
    model = Decoder(causal=False)
    findings = causal_leaks(model, tokens())
    assert [f.layer for f in findings] == ["blocks.0.attn", "blocks.1.attn"]
    first = findings[0]
    assert (first.layer_type, first.statistic, first.bound, first.batch) == (
        "MultiheadAttention",
        "future leak",
        "0",
        0,
    )
    assert first.note.startswith(
        "its output at position 0 depends on its input at later position(s) 1, 2, 3, 4, 5, 6"
    )
    assert "no causal mask, or one shifted by one?" in first.note
    assert first.observed > 0.01
    with pytest.raises(
        HealthError, match=r"causal health check failed: 2 finding\(s\) in 2 layer\(s\)"
    ) as error:
        check_causal(model, tokens())
    assert str(error.value).splitlines()[1].split() == [
        "layer",
        "type",
        "statistic",
        "observed",
        "bound",
        "position",
        "note",
    ]


def test_a_mask_shifted_by_one_leaks_the_next_position_only() -> None:
    torch.manual_seed(0)
    findings = causal_leaks(Decoder(shift=2), tokens(), positions=[2])
    assert [f.layer for f in findings] == ["blocks.0.attn", "blocks.1.attn"]
    assert "at later position(s) 3:" in findings[0].note and findings[0].batch == 2


def test_attention_handed_batch_first_input_without_batch_first_mixes_the_batch() -> None:
    torch.manual_seed(0)
    model = Decoder(batch_first=False, causal=False)
    findings = batch_leaks(model, tokens())
    assert [f.layer for f in findings] == ["blocks.0.attn", "blocks.1.attn"]
    assert findings[0].note.startswith("its output for sample 0 depends on its input for sample(s) 1, 2:")
    assert "without batch_first=True" in findings[0].note
    with pytest.raises(HealthError, match="batch independence health check failed") as error:
        check_batch_independence(model, tokens())
    assert "sample" in str(error.value).splitlines()[1].split()


class Centred(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h - h.mean(0))  # the bug: centred over the batch


def test_mixing_in_a_forward_s_own_code_is_placed_between_two_layers() -> None:
    (finding,) = batch_leaks(Centred(), torch.randn(3, 4))
    assert (finding.layer, finding.layer_type) == ("", "Centred")
    assert finding.note == (
        "its output for sample 0 depends on its input for sample(s) 1, 2 through Centred.forward's "
        "own code, between 'a' and 'b' (a reduction, reshape or transpose over the batch dimension?)"
    )
    wrapped = nn.Sequential(nn.Linear(4, 4), Centred())  # inside a block: the block is named
    (finding,) = batch_leaks(wrapped, torch.randn(3, 4))
    assert finding.layer == "1" and "between '1.a' and '1.b'" in finding.note


class Folded(nn.Module):
    """``view`` where ``transpose`` was meant: (batch, seq) memory read as (seq, batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.rnn, self.b = nn.Linear(8, 8), nn.GRU(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        out, _ = self.rnn(h.view(h.shape[1], h.shape[0], -1))
        return self.b(out.view(x.shape[0], x.shape[1], -1))


def test_a_view_that_folds_the_batch_is_found_where_samples_meet() -> None:
    # (3, 5) read as (5, 3): the first sample's outputs come from its own memory alone, the
    # last sample's do not. Layers after the view carry "the batch" on an axis that only has
    # its size; what decides a leak is whether the model's input for other samples reaches.
    torch.manual_seed(0)
    (finding,) = batch_leaks(Folded(), torch.randn(3, 5, 8))
    assert (finding.layer, finding.batch) == ("", 2)
    assert "through Folded.forward's own code, between 'rnn' and 'b'" in finding.note


def test_an_rnn_running_along_the_batch_leaks_one_way_only() -> None:
    # without batch_first, (batch, seq, dim) is read as (seq, batch, dim): sample k sees the
    # samples before it, so the first sample alone looks fine and the last one does not
    torch.manual_seed(0)
    model = nn.GRU(4, 4)
    x = torch.randn(3, 5, 4)
    assert batch_leaks(model, x, samples=[0]) == []
    (finding,) = batch_leaks(model, x)
    assert finding.batch == 2 and "without batch_first=True" in finding.note


def test_a_bidirectional_rnn_is_not_causal() -> None:
    (finding,) = causal_leaks(zoo.LSTMTagger(), torch.randint(0, 50, (3, 6)))
    assert finding.layer == "lstm" and "bidirectional" in finding.note
    assert causal_leaks(nn.LSTM(4, 4, batch_first=True), torch.randn(3, 6, 4)) == []


def test_a_module_given_a_tensor_and_what_was_made_from_it_is_not_blamed() -> None:
    # a residual block handed x and attention(x): the gradient with respect to the x passed in
    # also runs through the attention; the module's own one does not
    class AddNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(8)

        def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return self.norm(h + x)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.out = AddNorm()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.attn(x, x, x, need_weights=False)[0], x)

    torch.manual_seed(0)
    assert [f.layer for f in causal_leaks(Layer(), torch.randn(3, 5, 8))] == ["attn"]


def test_batchnorm_mixes_in_train_mode_only_and_the_model_is_left_as_it_was() -> None:
    torch.manual_seed(0)
    model = zoo.ResNetish()
    model.stem.eval()  # mixed modes
    model.fc.requires_grad_(False)
    flags, state = training_flags(model), {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 3, 32, 32)
    assert batch_leaks(model, x) == []  # eval mode: running statistics
    findings = batch_leaks(model, x, train=True)
    assert findings and {f.layer_type for f in findings} == {"BatchNorm2d"}
    assert "BatchNorm in train mode normalises over the batch" in findings[0].note
    assert training_flags(model) == flags and count_hooks(model) == 0
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # running stats too
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.fc.parameters()] == [False, False]


def test_a_frozen_embedding_still_carries_the_check() -> None:
    torch.manual_seed(0)
    model = Decoder(causal=False).requires_grad_(False)
    assert [f.layer for f in causal_leaks(model, tokens())] == ["blocks.0.attn", "blocks.1.attn"]
    assert not any(p.requires_grad for p in model.parameters())


def test_the_output_is_chosen_by_key_attribute_or_callable() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fine, self.leaky = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"ids": x.argmax(-1), "fine": self.fine(x), "leaky": self.leaky(x).cumsum(0)}

    x = torch.randn(3, 4)
    assert batch_leaks(Two(), x) == []  # the first floating-point output: "fine"
    assert [f.layer for f in batch_leaks(Two(), x, output="leaky")] == [""]
    assert [f.layer for f in batch_leaks(Two(), x, output=lambda out: out["leaky"])] == [""]
    with pytest.raises(ValueError, match=r"output='ids' must select a floating-point tensor.*torch.int64"):
        batch_leaks(Two(), x, output="ids")


def test_bad_arguments_are_named() -> None:
    model = nn.Linear(4, 2)
    with pytest.raises(
        ValueError, match=r"needs at least 2 samples in the batch: the output has shape \(1, 2\)"
    ):
        batch_leaks(model, torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"samples=\[3\]: need indices of the 3 samples"):
        batch_leaks(model, torch.randn(3, 4), samples=[3])
    with pytest.raises(ValueError, match=r"positions=\[\]: need indices of the 5 positions"):
        causal_leaks(model, torch.randn(3, 5, 4), positions=[])
    with pytest.raises(ValueError, match=r"shape \(3, 2\), no dimension 2; .* seq_dim="):
        causal_leaks(model, torch.randn(3, 4), seq_dim=2)
    with pytest.raises(ValueError, match=r"rtol must be a number in \[0, 1\), got rtol=2"):
        batch_leaks(model, torch.randn(3, 4), rtol=2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'mask'"):
        batch_leaks(model, torch.randn(3, 4), mask=None)


def test_a_forward_that_raises_leaves_the_model_as_it_was() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(), nn.Linear(5, 2))
    model[0].requires_grad_(False)
    flags = training_flags(model)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        batch_leaks(model, torch.randn(3, 4))
    assert count_hooks(model) == 0 and training_flags(model) == flags
    assert [p.requires_grad for p in model[0].parameters()] == [False, False]


def test_an_output_whose_rows_sum_to_one_does_not_hide_a_leak() -> None:
    # a plain sum of softmax rows is constant: its gradient is zero everywhere
    model = nn.Sequential(Centred(), nn.Softmax(dim=-1))
    assert [f.layer for f in batch_leaks(model, torch.randn(3, 4))] == ["0"]


def test_a_compiled_model_is_checked_through_its_original_modules() -> None:
    torch.manual_seed(0)
    model = Decoder(causal=False)
    compiled = torch.compile(model)  # (never called: nothing compiles)
    assert [f.layer for f in causal_leaks(compiled, tokens())] == ["blocks.0.attn", "blocks.1.attn"]
    assert count_hooks(model) == 0


class Noisy(nn.Module):
    """Dropout through the functional call without ``training=self.training``: always on."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(nn.functional.dropout(self.a(x), 0.5))


class GaussianNoise(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * torch.randn_like(x)  # no `if self.training`


def test_dropout_left_on_in_eval_is_named_where_it_is_drawn() -> None:
    from pytest_modelhooks import check_deterministic, nondeterministic_layers

    model = nn.Sequential(nn.Linear(3, 4), Noisy(), nn.Dropout(0.5))  # nn.Dropout is fine
    x = torch.randn(5, 3)
    flags, rng = training_flags(model), torch.get_rng_state()
    (finding,) = nondeterministic_layers(model, x)
    assert (finding.layer, finding.layer_type, finding.statistic, finding.bound) == (
        "1",
        "Noisy",
        "nondeterministic",
        "the same",
    )
    assert "drawn at random in Noisy.forward's own code: dropout left on" in finding.note
    assert finding.observed > 1e-3
    assert training_flags(model) == flags and count_hooks(model) == 0
    assert torch.equal(torch.get_rng_state(), rng)  # the draws came from a forked generator
    with pytest.raises(HealthError, match="eval determinism health check failed: 1 finding"):
        check_deterministic(model, torch.randn(5, 3))
    leaf = nn.Sequential(nn.Linear(3, 4), GaussianNoise(), nn.ReLU())
    (finding,) = nondeterministic_layers(leaf, torch.randn(5, 3))
    assert finding.layer == "1" and "drawn at random in it:" in finding.note
    check_deterministic(zoo.ResNetish(), torch.randn(2, 3, 16, 16))  # BatchNorm, Dropout: eval


def test_control_flow_drawn_at_random_is_reported_where_the_runs_part() -> None:
    from pytest_modelhooks import nondeterministic_layers

    # the two runs draw from generators seeded 1 and 2: a threshold between their draws
    draws = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        draws.append(float(torch.rand(())))
    threshold = sum(draws) / 2

    class Coin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) if float(torch.rand(())) > threshold else self.b(x)

    (finding,) = nondeterministic_layers(Coin(), torch.randn(2, 3))
    assert finding.layer == "" and "ran different modules, from 'a' on" in finding.note


class Checkpointed(nn.Module):
    """Two blocks under activation checkpointing; the first without a causal mask."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.first, self.second = Block(causal=False), Block()
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        x = checkpoint(self.first, x, use_reentrant=self.reentrant)
        return checkpoint(self.second, x, use_reentrant=self.reentrant)  # type: ignore[no-any-return]


def test_activation_checkpointing_is_gone_through_or_refused_by_name() -> None:
    # the backward runs the checkpointed blocks again: with the checks' hooks still on, it
    # builds the same graph; the reentrant flavour cannot go through autograd.grad at all
    torch.manual_seed(0)
    x = torch.randn(3, 6, 16)
    model = Checkpointed(reentrant=False)
    assert [f.layer for f in causal_leaks(model, x)] == ["first.attn"]
    assert [f.layer for f in causal_leaks(model, x, train=True)] == ["first.attn"]
    assert count_hooks(model) == 0
    with pytest.raises(RuntimeError, match=r"use_reentrant=True, which the gradients these checks take"):
        causal_leaks(Checkpointed(reentrant=True), x)


def test_a_module_called_twice_is_named_per_call() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(x, x, x, need_weights=False)[0]
            return self.head(x + self.attn(x, x, x, need_weights=False)[0])

    torch.manual_seed(0)
    model = Shared()
    assert [f.layer for f in causal_leaks(model, torch.randn(3, 5, 8))] == ["attn", "attn [call 2]"]
    assert count_hooks(model) == 0


def test_the_determinism_check_leaves_a_model_that_raises_as_it_was() -> None:
    from pytest_modelhooks import nondeterministic_layers

    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(), nn.Linear(5, 2))
    flags, rng = training_flags(model), torch.get_rng_state()
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        nondeterministic_layers(model, torch.ones(3, 4))
    assert count_hooks(model) == 0 and training_flags(model) == flags
    assert torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(ValueError, match=r"rtol must be a number in \[0, 1\), got rtol=True"):
        nondeterministic_layers(model, torch.ones(3, 4), rtol=True)
    with pytest.raises(ValueError, match=r"modules='decoder' matches no module of Sequential"):
        nondeterministic_layers(model, torch.ones(3, 4), modules="decoder")


class WithPositions(Decoder):
    """A decoder with learned positions: one NaN there blinds a gradient-based check."""

    def __init__(self, **block: object) -> None:
        super().__init__(**block)
        self.positions = nn.Parameter(torch.zeros(7, 16))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.positions[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_a_check_that_cannot_see_fails_saying_why_instead_of_passing() -> None:
    model = WithPositions(causal=False)  # it looks ahead...
    with torch.no_grad():
        model.positions[3, 0] = math.nan  # ...and one NaN would hide it
    for check in (causal_leaks, batch_leaks):
        found = check(model, tokens())
        assert [(f.layer, f.statistic) for f in found] == [("blocks.0.norm", "nonfinite")], check
        assert "cannot tell whether" in found[0].note and "fails rather than pass blind" in found[0].note
    with pytest.raises(HealthError, match="nonfinite"):
        check_causal(model, tokens())
    with pytest.raises(HealthError, match="nonfinite"):
        check_batch_independence(model, tokens())


def test_a_non_finite_gradient_alone_blinds_the_check_too() -> None:
    class SqrtAtZero(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # finite output, infinite gradient: sqrt at 0
            return self.proj(x) + (x - x).sqrt().sum(1, keepdim=True)

    found = batch_leaks(SqrtAtZero(), torch.randn(3, 4))
    assert [f.statistic for f in found] == ["nonfinite"] and "gradient is not finite" in found[0].note


class LabelDropout(nn.Module):
    """DiT's label embedder with its classifier-free-guidance dropout left on in eval mode: with
    probability 0.1 a label becomes the null class."""

    def __init__(self, classes: int = 10, dim: int = 8) -> None:
        super().__init__()
        self.table = nn.Embedding(classes + 1, dim)
        self.classes = classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        drop = torch.rand(labels.shape[0], device=labels.device) < 0.1  # no `if self.training`
        return self.table(torch.where(drop, self.classes, labels))


class Conditioned(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.labels = LabelDropout()
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 4)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.labels(labels)))


def test_a_rare_draw_is_found_every_time_named_where_it_happens() -> None:
    labels = torch.tensor([1, 2, 3])
    for _ in range(5):  # a 0.1 draw at batch 3 rarely changes an output between two runs
        found = nondeterministic_layers(Conditioned(), labels)
        assert [(f.layer, f.layer_type) for f in found] == [("labels", "LabelDropout")]
        assert "draws from torch's random generator (rand)" in found[0].note
        assert "whatever its probability" in found[0].note


def test_what_a_draw_upstream_changes_is_not_blamed() -> None:
    # an embedding given other ids, a LayerNorm whose output sums to ~0: neither drew
    class Jitter(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + 1e-9 * torch.randn_like(x)  # unguarded noise, tiny

    model = nn.Sequential(nn.Linear(8, 8), Jitter(), nn.LayerNorm(8), nn.Linear(8, 2))
    found = nondeterministic_layers(model, torch.randn(3, 8))
    assert [(f.layer, f.layer_type) for f in found] == [("1", "Jitter")]
    ids = torch.tensor([0, 5, 9])
    found = nondeterministic_layers(Conditioned(), ids)
    assert "labels.table" not in [f.layer for f in found]  # the embedding only looked up what it got


def test_a_deterministic_model_with_integer_inputs_passes() -> None:
    model = Decoder()
    assert nondeterministic_layers(model, tokens()) == []
    check_deterministic(model, tokens())


def test_a_leak_through_an_integer_input_is_found_beside_a_float_one() -> None:
    class Conditioned(nn.Module):
        """DiT's conditioning bug in small: the label embedding averaged over the batch."""

        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 8)
            self.embed = nn.Embedding(10, 8)
            self.out = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return self.out(self.proj(x) + self.embed(labels).mean(0, keepdim=True))

    x, labels = torch.randn(3, 4), torch.tensor([1, 4, 7])
    model = Conditioned()
    other = labels.clone()
    other[1] = 9
    with torch.no_grad():  # the truth: sample 1's label changes sample 0's output
        assert not torch.allclose(model(x, other)[0], model(x, labels)[0])
    found = batch_leaks(model, (x, labels))
    assert [(f.layer, f.statistic) for f in found] == [("", "batch leak")]
    assert "through the forward's own code" in found[0].note

    class Fine(Conditioned):
        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return self.out(self.proj(x) + self.embed(labels))

    assert batch_leaks(Fine(), (x, labels)) == []


def test_an_output_without_the_batch_axis_is_said_to_have_lost_it() -> None:
    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, need_weights=False)[0].mean(0)  # (seq, dim): no batch

    with pytest.raises(
        ValueError,
        match=r"the input's batch is 3 along dim=0, but the checked output has shape \(5, 8\): it lost",
    ):
        batch_leaks(Pooled(), torch.randn(3, 5, 8))


def test_a_position_picks_from_a_tuple_output() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.a(x), self.b(x).mean(0, keepdim=True).expand(3, 4)

    x = torch.randn(3, 4)
    assert batch_leaks(Two(), x, output=0) == []
    assert [f.layer for f in batch_leaks(Two(), x, output=1)] == [""]
    with pytest.raises(KeyError, match=r"output=2: the model returned 2 outputs"):
        batch_leaks(Two(), x, output=2)
    with pytest.raises(AttributeError, match=r"the model returned a tensor, which has no named outputs"):
        batch_leaks(nn.Linear(4, 4), x, output=0)


class GatedMixer(nn.Module):
    """A residual branch that mixes the batch behind a zero-initialised gate (adaLN-Zero, ReZero):
    at init the output does not show the leak, but training opens the gate at once."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.gate = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return h + self.gate * h.mean(0, keepdim=True)


def test_a_leak_behind_a_zero_initialised_gate_is_found_and_the_gate_is_put_back() -> None:
    model = GatedMixer()
    with untouched(model):
        (finding,) = batch_leaks(model, torch.randn(3, 4))
    assert finding.statistic == "batch leak"
    assert "all-zero parameter(s) gate made nonzero" in finding.note
    assert not model.gate.any()


def test_zero_biases_are_not_perturbed_and_not_mentioned() -> None:
    model = nn.Sequential(nn.Linear(4, 4), Centred())
    nn.init.zeros_(model[0].bias)
    (finding,) = batch_leaks(model, torch.randn(3, 4))
    assert "made nonzero" not in finding.note


def test_an_output_that_does_not_depend_on_the_input_fails_instead_of_passing() -> None:
    model = nn.Linear(4, 3)
    model.weight.requires_grad_(False)
    with torch.no_grad():
        model.weight.zero_()  # frozen at zero: the output is the bias, whatever the input
    for check in (check_batch_independence, check_causal):
        with pytest.raises(HealthError, match="does not depend on the model's input") as raised:
            check(model, torch.randn(3, 5, 4))
        assert [finding.statistic for finding in raised.value.findings] == ["unseen"]


def test_a_sample_whose_output_a_relu_zeroes_is_skipped_not_failed() -> None:
    """A small net's ReLU can zero every output of one sample: that sample cannot see, the
    others can, and the check reports what they show (nothing, here) instead of failing."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4))
        model[0].bias.zero_()
    batch = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [1.0, 2.0, 3.0, 4.0], [-1.0, -2.0, -3.0, -4.0]])
    assert batch_leaks(model, batch) == []  # samples 0 and 2 are all zeros after the ReLU; 1 sees
    dead = torch.full((3, 4), -1.0)
    (finding,) = batch_leaks(model, dead)  # no sample can see: the check says so
    assert finding.statistic == "unseen"


class BiasedAttention(nn.Module):
    """T5's way: the first block makes a position bias ``(1, heads, T, T)`` from buckets
    ``(T, T)`` (no sample's input reaches them) and hands it to the next block."""

    def __init__(self, dim: int = 16, heads: int = 4, *, first: bool) -> None:
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.bias = nn.Embedding(8, heads) if first else None

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, dim = x.shape
        if bias is None:
            assert self.bias is not None
            positions = torch.arange(length)
            buckets = (positions[None, :] - positions[:, None]).clamp(-4, 3) + 4
            bias = self.bias(buckets).permute(2, 0, 1).unsqueeze(0)
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1) @ v
        return self.out(attended.transpose(1, 2).reshape(batch, length, dim)), bias


class BiasedEncoder(nn.Module):
    def __init__(self, *, leak: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.blocks = nn.ModuleList([BiasedAttention(first=index == 0) for index in range(2)])
        self.mlp, self.leak = nn.Linear(16, 16), leak

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x, bias = self.embed(tokens), None
        for block in self.blocks:
            attended, bias = block(x, bias)
            x = x + attended
        h = self.mlp(x)
        return h - h.mean(0) if self.leak else h


def test_a_position_bias_shared_by_the_batch_is_no_leak_when_heads_number_the_samples() -> None:
    # batch 4, heads 4: the bias's head axis is the only one as long as the batch, yet the bias
    # is one for every sample (length 1 on the batch axis, made from buckets, not from tokens)
    torch.manual_seed(0)
    four = tokens(batch=4)
    assert batch_leaks(BiasedEncoder(), four) == []
    (finding,) = batch_leaks(BiasedEncoder(leak=True), four)
    assert finding.layer == "" and "between 'mlp'" not in finding.note and "after 'mlp'" in finding.note
