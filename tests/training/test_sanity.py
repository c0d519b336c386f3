"""check_loss_at_init, check_overfits and check_uses_input: healthy models pass with the
defaults, each planted bug fails with its reason."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
from torch import nn

from pytest_modelhooks import HealthError
from pytest_modelhooks.training import check_loss_at_init, check_overfits, check_uses_input, input_use
from tests import zoo
from tests.architectures import GPT, ConvNeXt
from tests.helpers import untouched


def classifier(classes: int = 10) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, classes))


def batch(classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(32, 16, generator=generator), torch.randint(0, classes, (32,), generator=generator)


def gpt_loss(output: tuple[torch.Tensor, Any], target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(output[0].flatten(0, 1), target.flatten())


def healthy_cases() -> list[tuple[str, nn.Module, Any, Any]]:
    cross_entropy = nn.functional.cross_entropy
    cases: list[tuple[str, nn.Module, Any, Any]] = [("mlp classifier", classifier(), batch(), cross_entropy)]
    model, images = zoo.build("resnetish")
    labels = torch.randint(0, 10, (images.shape[0],))
    cases.append(("resnetish", model, (images, labels), cross_entropy))
    gpt = GPT()
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    cases.append(("nanoGPT-style", gpt, (tokens, torch.roll(tokens, -1, 1)), gpt_loss))
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    cases.append(("ConvNeXt-style", ConvNeXt(), (images, labels), cross_entropy))
    return cases


@pytest.mark.parametrize("case", healthy_cases(), ids=lambda case: case[0])
def test_healthy_models_pass_every_check_with_the_defaults(case: tuple[str, nn.Module, Any, Any]) -> None:
    _, model, pair, loss_fn = case
    classes = 64 if case[0] == "nanoGPT-style" else 10
    # a language model's loss wraps cross-entropy: its chance value is given
    expected = math.log(classes) if case[0] == "nanoGPT-style" else None
    with untouched(model):
        loss = check_loss_at_init(model, pair, loss_fn, expected=expected)
        curve = check_overfits(model, pair, loss_fn)
        check_uses_input(model, pair[0])
    assert curve.reached and curve.last <= curve.first / 10
    assert math.isfinite(loss)  # the loss on these labels (judged averaged over every label)


def test_an_eval_mode_model_whose_batch_norms_never_saw_a_batch_is_told_to_check_in_train_mode() -> None:
    # eval mode normalises with the initial running statistics (mean 0, variance 1): nothing
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1)]
    for _ in range(6):
        conv = nn.Conv2d(8, 8, 3, padding=1)
        with torch.no_grad():
            conv.weight.mul_(4)  # (each convolution grows the std: only a norm that works tames it)
        layers += [conv, nn.BatchNorm2d(8), nn.ReLU()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    pair = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    check_loss_at_init(model, pair)  # train mode, as the first step runs: chance
    with untouched(model.eval()), pytest.raises(HealthError) as raised:
        check_loss_at_init(model, pair)
    assert "the model is in eval mode, and its 6 batch norms ('2' first) normalise" in str(raised.value)
    model[2].num_batches_tracked += 1  # (a batch norm with statistics of its own is not counted)
    with pytest.raises(HealthError) as raised:
        check_loss_at_init(model, pair)
    assert "its 5 batch norms ('5' first)" in str(raised.value)


def test_a_language_models_logits_and_targets_need_no_loss_of_their_own() -> None:
    """nanoGPT's ``(logits, loss)`` output: cross-entropy gets the logits, (batch, length,
    vocab) against (batch, length), and chance is log(vocab)."""
    gpt = GPT()
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    pair = (tokens, torch.roll(tokens, -1, 1))
    with untouched(gpt):
        loss = check_loss_at_init(gpt, pair)
        curve = check_overfits(gpt, pair)
    with torch.no_grad():
        torch.manual_seed(0)  # (the check runs in the model's mode, seeded with 0: dropout alike)
        logits = gpt(tokens)[0]
    assert loss == pytest.approx(float(nn.functional.cross_entropy(logits.flatten(0, 1), pair[1].flatten())))
    assert curve.reached
    with torch.no_grad():
        gpt.lm_head.weight.mul_(30)  # confident at init: judged against log(64), not log(16)
    with pytest.raises(HealthError, match=r"above 4\.159 = log\(64 classes\)"):
        check_loss_at_init(gpt, pair)


class Heads(nn.Module):
    """Returns a dict: features and logits, or (``named="scores"``) scores alone."""

    def __init__(self, named: str = "logits") -> None:
        super().__init__()
        self.body, self.head, self.named = nn.Linear(16, 32), nn.Linear(32, 10), named

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.body(x)
        return {"features": features, self.named: self.head(features.relu())}


def test_a_dict_output_gives_its_logits_or_output_picks_the_part() -> None:
    torch.manual_seed(0)
    model, pair = Heads(), batch()
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(model(pair[0])["logits"], pair[1]))
    assert check_loss_at_init(model, pair) == pytest.approx(expected)
    scores = Heads("scores")
    scores.load_state_dict(model.state_dict())
    with pytest.raises(TypeError, match=r"returned a dict, not a tensor of logits; pick them with output="):
        check_loss_at_init(scores, pair)
    assert check_loss_at_init(scores, pair, output="scores") == pytest.approx(expected)
    assert check_overfits(scores, pair, output=lambda out: out["scores"], steps=300, lr=1e-2).reached


def test_classes_second_is_torchs_layout_where_both_layouts_fit() -> None:
    class Square(nn.Module):  # (batch, 10 classes, 10 positions) against (batch, 10)
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(10, 100)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x).view(-1, 10, 10)

    torch.manual_seed(0)
    model, inputs, target = Square(), torch.randn(4, 10), torch.randint(0, 10, (4, 10))
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(model(inputs), target))
    assert check_loss_at_init(model, (inputs, target), rtol=1.0) == pytest.approx(expected)


def test_a_head_initialised_ten_times_too_large_is_named() -> None:
    model = classifier()
    with torch.no_grad():
        model[4].weight.mul_(10)
        model[4].bias.mul_(10)
    with pytest.raises(HealthError, match=r"above 2\.303 = log\(10 classes\)") as raised:
        check_loss_at_init(model, batch())
    message = str(raised.value)
    assert "the output's std is" in message and "multiplies its input's std by" in message
    # the head makes the logits and scaled them most: one clause, its weights against the default
    scale = re.search(
        r"layer 4 \(Linear, weight std ([\d.]+): ([\d.]+)x PyTorch's default for fan_in 32\)", message
    )
    assert scale is not None, message
    default_std = float(classifier()[4].weight.detach().std())  # the same seed, before the tenfold
    assert float(scale[1]) == pytest.approx(10 * default_std, rel=0.01)
    assert float(scale[2]) == pytest.approx(10 * default_std * math.sqrt(3 * 32), rel=0.01)
    assert 9 < float(scale[2]) < 11
    assert raised.value.findings[0].statistic == "loss at init"


def test_a_head_drawn_at_a_fixed_std_is_named_beside_the_loudest_layer() -> None:
    # Inception-v3's head: weights drawn at std 0.1 whatever the fan-in, far above the default
    # for 2,048 inputs; here a layer before it scales its input more, and both are named
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 10))
    with torch.no_grad():
        model[0].weight.mul_(20)
        nn.init.normal_(model[2].weight, std=0.5)
    with pytest.raises(HealthError) as raised:
        check_loss_at_init(model, batch())
    message = str(raised.value)
    head_std = float(model[2].weight.detach().std())
    assert (
        f"from layer 2 (Linear, weight std {head_std:.3g}: {head_std * math.sqrt(3 * 64):.3g}x PyTorch's "
        "default for fan_in 64), and layer 0 (Linear) multiplies its input's std by"
    ) in message


def test_a_head_tied_to_an_embedding_is_named_with_the_tie() -> None:
    # nn.Embedding draws N(0, 1): tied to the head, the logits' std is sqrt(dim); GPT-2 draws 0.02
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.norm, self.head = nn.Embedding(50, 64), nn.LayerNorm(64), nn.Linear(64, 50)
            self.head.weight = self.embed.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(self.embed(ids)))

    torch.manual_seed(0)
    model, ids = Tied(), torch.randint(0, 50, (4, 17))
    with pytest.raises(HealthError, match=r"fan_in 64, tied to embed\.weight \(Embedding\)\)"):
        check_loss_at_init(model, (ids[:, :-1], ids[:, 1:]))
    with torch.no_grad():
        nn.init.normal_(model.embed.weight, std=0.02)
    assert check_loss_at_init(model, (ids[:, :-1], ids[:, 1:])) == pytest.approx(math.log(50), rel=0.15)


def test_logits_made_outside_any_layer_name_only_the_loudest() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = classifier()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x) * 30.0

    with pytest.raises(HealthError) as raised:
        check_loss_at_init(Scaled(), batch())
    message = str(raised.value)
    assert (
        "from layer" not in message and "layer net." in message and "multiplies its input's std by" in message
    )


def test_the_chance_loss_of_bce_and_an_explicit_expected_value() -> None:
    model = nn.Sequential(nn.Linear(16, 1), nn.Flatten(0))
    nn.init.zeros_(model[0].weight)
    nn.init.zeros_(model[0].bias)
    target = torch.randint(0, 2, (32,)).float()
    loss = check_loss_at_init(model, (batch()[0], target), nn.functional.binary_cross_entropy_with_logits)
    assert loss == pytest.approx(math.log(2), rel=1e-3)
    check_loss_at_init(classifier(), batch(), expected=2.3, rtol=0.1)
    with pytest.raises(HealthError, match="above 1 = expected"):
        check_loss_at_init(classifier(), batch(), expected=1.0)
    with pytest.raises(ValueError, match="expected= is needed for this loss_fn"):
        check_loss_at_init(classifier(), (batch()[0], torch.randn(32, 10)), nn.functional.mse_loss)


def test_a_frozen_stack_does_not_overfit_and_is_named() -> None:
    model = classifier()
    model[0].requires_grad_(False)
    model[2].requires_grad_(False)
    with pytest.raises(HealthError, match="does not memorise one batch") as raised:
        check_overfits(model, batch())
    assert [(f.layer, f.statistic) for f in raised.value.findings] == [("0", "frozen"), ("2", "frozen")]
    assert raised.value.findings[0].note.startswith("frozen: 0.weight, 0.bias require no grad, so they never")
    assert model[0].weight.requires_grad is False  # the user's model as it was
    model[2].requires_grad_(True)
    model[2].bias.requires_grad_(False)
    with pytest.raises(HealthError) as raised:
        check_overfits(model, batch(), steps=5)
    assert [f.note for f in raised.value.findings if f.layer == "2"] == [
        "frozen: 2.bias requires no grad, so it never trains (requires_grad_(True))"
    ]


def test_gradients_cleared_between_backward_and_step_are_named() -> None:
    def step(model: nn.Module, pair: Any, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(pair[0]), pair[1])
        loss.backward()
        optimizer.zero_grad()  # the bug: the step sees no gradient
        optimizer.step()
        return loss

    with pytest.raises(HealthError) as raised:
        check_overfits(classifier(), batch(), step=step)
    notes = {f.note for f in raised.value.findings}
    assert all("zero_grad() between backward() and step()" in note for note in notes)
    assert len(raised.value.findings) == 6  # every parameter


def test_a_dead_relu_stack_does_not_overfit_and_the_dead_layers_are_named() -> None:
    model = classifier()
    with torch.no_grad():
        model[0].bias.fill_(-10.0)
        model[2].bias.fill_(-10.0)
    with pytest.raises(HealthError) as raised:
        check_overfits(model, batch())
    dead = {f.layer for f in raised.value.findings if f.statistic == "dead"}
    assert dead == {"0", "2"}


def test_a_learning_rate_of_zero_is_the_reason() -> None:
    with pytest.raises(HealthError, match="learning rate is 0") as raised:
        check_overfits(classifier(), batch(), lr=0)
    assert raised.value.findings[0].statistic == "lr"


def test_the_users_model_optimizer_and_rng_are_left_alone() -> None:
    model = classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pair = batch()
    state = torch.random.get_rng_state()
    with untouched(model):
        check_overfits(model, pair, optimizer=torch.optim.AdamW, lr=3e-3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert optimizer.state_dict()["state"] == {}
    check_overfits(model, pair, optimizer=lambda params: torch.optim.Adam(params, lr=3e-3))


def test_an_input_multiplied_by_zero_is_named_as_unused() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.image = nn.Linear(16, 8)
            self.extra = nn.Linear(5, 8)

        def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
            return self.image(image) + 0 * self.extra(extra)  # the bug: the extra input is switched off

    model = TwoInputs()
    (finding,) = input_use(model, (torch.randn(4, 16), torch.randn(4, 5)))
    assert (finding.layer, finding.statistic) == ("extra", "unused input")
    with pytest.raises(HealthError, match="1 input"):
        check_uses_input(model, {"image": torch.randn(4, 16), "extra": torch.randn(4, 5)})


def test_token_positions_the_output_ignores_are_named() -> None:
    class Truncating(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.head = nn.Linear(8, 50)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(tokens[:, :6]))  # the bug: a context of 6

    (finding,) = input_use(Truncating(), torch.randint(0, 50, (2, 10)))
    assert (finding.statistic, finding.observed) == ("unused positions", 4)
    assert "position(s) 6, 7, 8, 9 (of 10" in finding.note
    assert input_use(GPT(), torch.randint(0, 64, (2, 16))) == []  # every position used


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: check_overfits(classifier(), batch(), steps=0), ValueError, "steps must be a positive int"),
        (
            lambda: check_overfits(classifier(), batch()[0]),
            TypeError,
            r"batch must be an \(input, target\) pair",
        ),
        (
            lambda: check_overfits(classifier(), batch(), lambda o, t: (o - 1) ** 2),
            ValueError,
            r"loss_fn must return a scalar tensor, got \(32, 10\)",
        ),
        (
            lambda: check_overfits(classifier(), batch(), optimizer="lion"),
            ValueError,
            "optimizer='lion': expected",
        ),
        (
            lambda: check_overfits(
                classifier(), batch(), optimizer=torch.optim.SGD(classifier().parameters())
            ),
            TypeError,
            "an optimizer instance holds the user's parameters",
        ),
        (
            lambda: check_loss_at_init(classifier(), batch(), rtol=0),
            ValueError,
            "rtol must be a positive number",
        ),
        (
            lambda: check_loss_at_init(classifier(), (batch()[0], batch()[1] + 10)),
            ValueError,
            r"check_loss_at_init: loss_fn failed on the output \(32, 10\) float32 and the target "
            r"\(32,\) int64: IndexError: Target 1\d is out of bounds",
        ),
        (
            lambda: check_overfits(classifier(), (batch()[0], batch()[1].float())),
            ValueError,
            r"check_overfits: loss_fn failed on the output \(32, 10\) float32 and the target \(32,\) "
            r"float32: RuntimeError: expected",
        ),
    ],
    ids=["steps", "batch", "loss", "optimizer-name", "optimizer-instance", "rtol", "labels", "target-dtype"],
)
def test_bad_arguments_are_refused_naming_them(call: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()
