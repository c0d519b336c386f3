"""``modelhooks learn``: the training recipe's first checks from the command line, on a random
batch with random targets shaped from the output."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pytest_modelhooks.cli import main
from tests.helpers import untouched

FACTORIES = """
import torch
from torch import nn

def classifier():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))

def loud():
    model = classifier()
    with torch.no_grad():
        model[2].weight.mul_(10)
    return model

def frozen():
    model = classifier()
    model[0].requires_grad_(False)
    return model

class Ignores(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 10)
    def forward(self, x):
        return self.lin(x * 0)

class Tokens(nn.Module):
    def __init__(self, vocab=30):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, 16), nn.Linear(16, vocab)
    def forward(self, ids):
        return self.head(self.embed(ids))

def segmenter():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1))

def single():
    return nn.Linear(16, 1)

class Seq2Seq(nn.Module):
    # an encoder-decoder as transformers writes one: the decoder ids come from the command
    class config:
        is_encoder_decoder, vocab_size = True, 30
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.head = nn.Linear(8, 30)
    def forward(self, input_ids, decoder_input_ids):
        return self.head(self.embed(decoder_input_ids) + self.embed(input_ids).mean(1, keepdim=True))

class Scores(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 10)
    def forward(self, x):
        return {"scores": self.lin(x), "ids": x.argmax(-1)}
"""


@pytest.fixture(autouse=True)
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "learn_models.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("learn_models", None)


def test_a_healthy_classifier_passes_and_its_loss_at_init_is_the_real_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["learn", "learn_models:classifier", "--input-size", "8,16"]) == 0
    out = capsys.readouterr().out
    # independently: the factory's model under seed 0, the batch from seed 0, the labels from seed 1
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    batch = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(model(batch), labels))
    assert out.splitlines()[0] == "Sequential on a 8,16 input against random class ids (8,) of 10 classes:"
    assert f"  loss at init: ok, {loss:.4g} (chance {math.log(10):.4g})" in out
    assert "  memorises the batch: ok, loss" in out and "  uses its input: ok" in out


def test_each_check_that_fails_says_why_and_the_exit_status_is_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["learn", "learn_models:loud", "--input-size", "8,16"]) == 1
    out = capsys.readouterr().out
    assert "  loss at init: FAILED\n    loss-at-init check failed:" in out
    assert "layer 2 (Linear, weight std" in out and "x PyTorch's default for fan_in 32" in out
    assert main(["learn", "learn_models:frozen", "--input-size", "8,16", "--checks", "overfit"]) == 1
    out = capsys.readouterr().out
    assert "  memorises the batch: FAILED" in out and "frozen: 0.weight, 0.bias" in out
    assert "loss at init" not in out and "uses its input" not in out  # only the checks asked for
    assert main(["learn", "learn_models:Ignores", "--input-size", "8,16", "--checks", "input"]) == 1
    out = capsys.readouterr().out
    assert "  uses its input: FAILED" in out and "the input x (8, 16) changes no output" in out


def test_targets_are_shaped_from_the_output(capsys: pytest.CaptureFixture[str]) -> None:
    # a token model's (batch, length, vocab) logits take (batch, length) ids, judged against log(vocab)
    assert main(["learn", "learn_models:Tokens", "--checks", "init", "--format", "json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "a batch of 8,8 from the first layer 'embed' (Embedding)" in captured.err
    assert report["targets"] == "class ids (8, 8) of 30 classes"
    assert report["checks"]["init"]["expected"] == pytest.approx(math.log(30))
    # an encoder-decoder's (batch, decoder length, vocab) against its decoder's ids' shape
    assert (
        main(["learn", "learn_models:Seq2Seq", "--input-size", "4,6", "--checks", "init", "--format", "json"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["targets"] == "class ids (4, 8) of 30 classes"
    # a segmenter's (batch, classes, height, width) take (batch, height, width): classes second
    arguments = ["learn", "learn_models:segmenter", "--input-size", "2,3,8,8", "--checks", "init"]
    assert main([*arguments, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["targets"] == "class ids (2, 8, 8) of 5 classes"
    # one logit: 0/1 labels for bce; values for mse, whose loss at init needs --expected
    assert (
        main(["learn", "learn_models:single", "--input-size", "8,16", "--loss", "bce", "--checks", "init"])
        == 0
    )
    assert "random 0/1 labels (8, 1):" in capsys.readouterr().out
    mse = ["learn", "learn_models:single", "--input-size", "8,16", "--loss", "mse", "--checks", "init"]
    assert main(mse) == 0
    assert "loss at init: not judged: mse has no chance value; give --expected" in capsys.readouterr().out
    assert main([*mse, "--expected", "100"]) == 1
    assert "below 100 = expected" in capsys.readouterr().out


def test_an_output_part_is_picked_with_output(capsys: pytest.CaptureFixture[str]) -> None:
    arguments = ["learn", "learn_models:Scores", "--input-size", "8,16"]
    assert main([*arguments, "--output", "scores", "--steps", "300", "--lr", "0.01"]) == 0
    assert "memorises the batch: ok" in capsys.readouterr().out


def test_the_json_report_has_every_check_and_the_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["learn", "learn_models:loud", "--input-size", "8,16", "--format", "json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["input_size"] == [8, 16] and report["passed"] is False
    assert list(report["checks"]) == ["init", "overfit", "input"]
    assert report["checks"]["init"]["passed"] is False
    (finding,) = report["checks"]["init"]["findings"]
    assert finding["statistic"] == "loss at init" and finding["observed"] > math.log(10) * 1.15
    overfit = report["checks"]["overfit"]
    assert overfit["passed"] is True and len(overfit["losses"]) > 1
    assert overfit["best"] == min(overfit["losses"]) <= overfit["target"] == overfit["first"] / 10
    assert report["checks"]["input"] == {"passed": True, "findings": []}


def test_the_model_is_left_as_it_was(tmp_path: Path) -> None:
    (tmp_path / "learn_instance.py").write_text(
        "from learn_models import classifier\nINSTANCE = classifier()\n"
    )
    import learn_instance

    with untouched(learn_instance.INSTANCE):
        assert main(["learn", "learn_instance:INSTANCE", "--input-size", "8,16"]) == 0
    sys.modules.pop("learn_instance", None)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["learn_models:classifier", "--input-size", "8,16", "--checks", "init,fit"], "--checks 'init,fit'"),
        (["learn_models:single", "--input-size", "8,16"], "no dimension of 2 or more classes"),
        (["learn_models:Scores", "--input-size", "8,16"], "the model returned a dict, not logits"),
        (["learn_models:Scores", "--input-size", "8,16", "--output", "nope"], "'nope' is not a key"),
        (["learn_models:Scores", "--input-size", "8,16", "--output", "ids"], "floating-point tensor"),
        (["learn_models:classifier", "--input-size", "8,16", "--steps", "0"], "--steps 0: must be positive"),
        (
            ["learn_models:classifier", "--input-size", "8,16", "--lr", "-1"],
            "--lr -1.0: must be positive or 0",
        ),
    ],
)
def test_bad_command_lines_are_usage_errors_naming_the_option(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["learn", *arguments])
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_the_optimizers_offered_are_the_librarys() -> None:
    from pytest_modelhooks.cli.learn import OPTIMIZERS
    from pytest_modelhooks.training.overfit import _OPTIMIZERS

    assert set(OPTIMIZERS) == set(_OPTIMIZERS)
