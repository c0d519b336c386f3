from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pytest_modelhooks.cli import main

FACTORIES = """
import torch
from torch import nn

def small():
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)]
    return nn.Sequential(*layers)

class Big(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(24)])
    def forward(self, x):
        return self.layers(x)

INSTANCE = small()
NOT_A_MODEL = 3

def built(width, kinds=("relu",)):
    acts = {"relu": nn.ReLU, "tanh": nn.Tanh}
    return nn.Sequential(nn.Conv2d(3, width, 3), *[acts[kind]() for kind in kinds])

def returns_int():
    return 3

class Lookahead(nn.Module):
    # a language model whose attention has no causal mask (or a correct one)
    def __init__(self, masked=False):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 20)
        self.masked = masked
    def forward(self, tokens):
        x = self.embed(tokens)
        n = tokens.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool).triu(1) if self.masked else None
        return self.head(self.attn(x, x, x, attn_mask=mask, need_weights=False)[0])

class Doubles(nn.Module):
    def forward(self, x):
        return 2 * x

def strided():
    # needs 75x75 pixels or more: the third convolution has nothing to read in 64x64
    return nn.Sequential(nn.Conv2d(3, 8, 7, stride=8), nn.Conv2d(8, 8, 5, stride=4), nn.Conv2d(8, 4, 3))

class Patches(nn.Module):
    image_size = 32  # as torchvision's ViT says it
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, stride=4)
        self.pos = nn.Parameter(torch.zeros(1, 64, 8))
    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos

class Audio(nn.Module):
    # raw audio, (B, L): the forward adds the channel; 64 samples are too few for 3 strides of 5
    def __init__(self):
        super().__init__()
        first, more = nn.Conv1d(1, 4, 10, stride=5), [nn.Conv1d(4, 4, 10, stride=5) for _ in "ab"]
        self.convs = nn.Sequential(first, *more)
    def forward(self, audio):
        return self.convs(audio.unsqueeze(1))

class Seq2Seq(nn.Module):
    # an encoder-decoder as transformers writes one: it refuses to run without decoder ids
    class config:
        is_encoder_decoder, vocab_size = True, 30
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.head = nn.Linear(8, 30)
    def forward(self, input_ids, decoder_input_ids=None):
        if decoder_input_ids is None:
            raise ValueError("You have to specify either decoder_input_ids or decoder_inputs_embeds")
        return self.head(self.embed(decoder_input_ids) + self.embed(input_ids).mean(1, keepdim=True))

class BlockSize(nn.Module):
    # nanoGPT's check of the sequence length, as a bare assert or with a message
    def __init__(self, said=True):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.said = said
    def forward(self, tokens):
        if self.said:
            assert tokens.shape[1] <= 4, f"sequence of length {tokens.shape[1]}, block size is only 4"
        assert tokens.shape[1] <= 4
        return self.embed(tokens)

def exploding():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(4)])
    with torch.no_grad():
        for layer in model:
            layer.weight.mul_(5.0)  # each layer multiplies the std by ~3
    return model
"""


@pytest.fixture(autouse=True)
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cli_models.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("cli_models", None)


def test_summary_text_is_the_snapshot_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", "cli_models:small", "--input-size", "1,3,16,16"]) == 0
    out = capsys.readouterr().out
    assert "Total params: 242" in out and "(1, 8, 14, 14)" in out
    from cli_models import small

    from pytest_modelhooks import model_summary

    assert out == str(model_summary(small(), (1, 3, 16, 16))) + "\n"


def test_summary_json_and_markdown(capsys: pytest.CaptureFixture[str]) -> None:
    main(["summary", "cli_models:INSTANCE", "--input-size", "2x3x10x10", "--format", "json", "--depth", "1"])
    data = json.loads(capsys.readouterr().out)
    assert data["total_params"] == 242 and data["output_shapes"] == [2, 2]
    main(["summary", "cli_models:small", "--input-size", "1,3,8,8", "--format", "markdown"])
    markdown = capsys.readouterr().out
    assert "| `0` | Conv2d | (1, 3, 8, 8) | (1, 8, 6, 6) | 224 |" in markdown


def test_meta_builds_a_big_model_without_memory(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", "cli_models:Big", "--input-size", "1,4096", "--meta", "--depth", "1"]) == 0
    assert f"Total params: {24 * (4096 * 4096 + 4096):,}" in capsys.readouterr().out


def test_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sizes", "cli_models:small", "--size", "16,16", "--modules", "leaves"]) == 0
    lines = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == "Layer sizes"  # the text a model_snapshot of these sizes stores
    assert lines[1] == "0 (Conv2d) (1, 8, 14, 14)" and lines[-1] == "4 (Linear) (1, 2)"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["summary", "cli_models"], "expected PACKAGE.MODULE:FACTORY"),
        (["summary", "nowhere:small"], "cannot import 'nowhere'"),
        (["summary", "cli_models:missing"], "'cli_models' has no attribute 'missing'"),
        (["summary", "cli_models:NOT_A_MODEL"], "'NOT_A_MODEL' is neither an nn.Module nor callable"),
        (["summary", "cli_models:returns_int"], "returned int, not an nn.Module"),
        (
            ["summary", "cli_models:small", "--input-size", "1,a"],
            "--input-size '1,a': expected comma-separated",
        ),
        (["sizes", "cli_models:small", "--size", "0,4"], "--size '0,4': expected comma-separated positive"),
        # a stray separator is no dimension: (1, 3) would have reached the model
        (["summary", "cli_models:small", "--input-size", "1,3,x"], "--input-size '1,3,x': expected"),
        (["summary", "cli_models:small", "--input-size", "1,3,,8"], "--input-size '1,3,,8': expected"),
        (["summary", "cli_models:small", "--depth", "-1"], "--depth -1: must be >= 0"),
    ],
)
def test_bad_arguments_exit_2_naming_them(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_model_error_exits_1_naming_the_layer(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", "cli_models:small", "--input-size", "1,4,16,16"]) == 1
    assert "layer '0' (Conv2d, in_channels=3) got input (1, 4, 16, 16)" in capsys.readouterr().err


def test_the_modelhooks_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("modelhooks")
    if not script.exists():
        pytest.skip("the package is not installed here (no console script)")
    ok = subprocess.run(
        [script, "sizes", "cli_models:small", "--size", "8,8"], cwd=tmp_path, capture_output=True, text=True
    )
    assert ok.returncode == 0 and ok.stdout.splitlines()[-1].split()[-2:] == ["(1,", "2)"]
    bad = subprocess.run([script, "sizes", "cli_models"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and "expected PACKAGE.MODULE:FACTORY" in bad.stderr
    assert bad.stderr.startswith("usage: modelhooks ")  # the name the user typed


def test_python_dash_m(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pytest_modelhooks", "sizes", "cli_models:small", "--size", "8,8"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.splitlines()[-1].split()[-2:] == ["(1,", "2)"]
    bad = subprocess.run(
        [sys.executable, "-m", "pytest_modelhooks"], cwd=tmp_path, capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.startswith("usage: python -m pytest_modelhooks ")


def test_health_of_a_sound_model_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["health", "cli_models:small", "--input-size", "8,3,16,16", "--train", "--max-dead", "0.5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("Activation statistics (mean over 3 batches)\n")
    assert "Gradient statistics (mean over 3 steps)" in out and "4.weight" in out
    assert out.rstrip().endswith("No findings with these bounds.")
    # with no bound, what was judged is said: an exploding model passes only that far
    assert main(["health", "cli_models:exploding", "--input-size", "16,32"]) == 0
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last.startswith("No findings; no bound was given, so only non-finite values were judged (--std, ")
    assert "--max-grad-norm" not in last  # (gradient bounds need --train)


def test_health_names_each_bad_layer_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["health", "cli_models:exploding", "--input-size", "16,32", "--std", "0.1,5", "--format", "json"]
    assert main(argv) == 1
    report = json.loads(capsys.readouterr().out)
    exploding = [finding["layer"] for finding in report["findings"] if finding["note"] == "exploding"]
    assert exploding == ["1", "2", "3"]  # the first layer (std ~3) is within bounds
    assert report["activations"]["batches"] == [0, 1, 2] and "gradients" not in report


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-dead", "2"], "--max-dead must be a fraction in [0, 1], got --max-dead=2.0"),
        (["--std", "low,high"], "--std: expected two numbers 'low,high', got 'low,high'"),
        (["--batches", "0"], "--batches 0: must be >= 1"),
        (["--max-std-growth", "0"], "--max-std-growth must be > 0, got --max-std-growth=0.0"),
        (
            ["--train", "--min-grad-norm", "-1"],
            "--min-grad-norm must be a non-negative number (a gradient norm), got --min-grad-norm=-1.0",
        ),
    ],
)
def test_health_bad_bounds_exit_2(extra: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["health", "cli_models:small", "--input-size", "2,3,8,8", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_health_writes_its_pictures_and_judges_the_gradient_bounds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    plots = tmp_path / "plots"
    argv = ["health", "cli_models:small", "--input-size", "8,3,16,16", "--train", "--plot", str(plots)]
    assert main([*argv, "--min-grad-norm", "1e9"]) == 1  # every gradient is below it
    out = capsys.readouterr().out
    assert "Gradient findings (" in out and "vanishing" in out
    assert out.rstrip().splitlines()[-2:] == [
        f"plot: {plots / 'activations.png'}",
        f"plot: {plots / 'gradients.png'}",
    ]
    assert sorted(path.name for path in plots.iterdir()) == ["activations.png", "gradients.png"]
    assert all(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in plots.iterdir())
    assert (
        main(
            [
                "health",
                "cli_models:small",
                "--input-size",
                "8,3,16,16",
                "--plot",
                str(tmp_path / "f"),
                "--format",
                "json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["plots"] == [str(tmp_path / "f" / "activations.png")]


def test_health_of_a_model_that_fails_names_the_layer(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", "cli_models:small", "--input-size", "2,4,16,16"]) == 1
    assert "layer '0' (Conv2d, in_channels=3) got input (2, 4, 16, 16)" in capsys.readouterr().err


def test_a_factory_called_with_literal_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    factory = "cli_models:built(width=4, kinds=['relu', 'tanh'])"
    assert main(["sizes", factory, "--size", "8,8", "--modules", "leaves"]) == 0
    lines = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    assert lines[1:] == ["0 (Conv2d) (1, 4, 6, 6)", "1 (ReLU) (1, 4, 6, 6)", "2 (Tanh) (1, 4, 6, 6)"]
    assert main(["summary", "cli_models:built(2)", "--input-size", "1,3,8,8", "--meta"]) == 0
    assert "Total params: 56" in capsys.readouterr().out  # 3 * 2 * 9 + 2, on meta


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("cli_models:built(width=open('x'))", "must be Python literals"),
        ("cli_models:built(width=4", "closed by ')'"),
        ("cli_models:built(4, depth=4)", "unexpected keyword argument 'depth'"),
        ("cli_models:built()", "missing a required argument: 'width'"),
        ("cli_models:built(**{'width': 4})", "no **"),
        ("cli_models:(width=4)", "expected PACKAGE.MODULE:FACTORY"),
        ("cli_models:INSTANCE(4)", "'INSTANCE' is a model instance, not a factory to call"),
    ],
)
def test_bad_factory_arguments_exit_2_before_building(
    factory: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["sizes", factory])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not Path("x").exists()  # nothing was evaluated


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device", "gpu0"], "--device 'gpu0': not a torch device"),
        (["--device", "cuda", "--meta"], "--device cuda and --meta"),
        pytest.param(
            ["--device", "cuda"],
            "cuda is not available on this machine",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
    ],
)
def test_bad_devices_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["summary", "cli_models:small", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_leaks_names_the_layer_that_looks_ahead_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["leaks", "cli_models:Lookahead", "--input-size", "3,6"]) == 0  # batch only
    assert capsys.readouterr().out.strip() == "No leaks: Lookahead is batch independent on a 3,6 input."
    assert main(["leaks", "cli_models:Lookahead", "--input-size", "3,6", "--causal"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Outputs depend on later positions (1):"
    assert out[2].split()[:3] == ["attn", "MultiheadAttention", "future"]
    argv = ["leaks", "cli_models:Lookahead(masked=True)", "--input-size", "3,6", "--causal"]
    argv += ["--format", "json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == {"batch": [], "causal": []}
    assert main([*argv[:-2], "--positions", "2", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["causal"] == []
    argv = ["leaks", "cli_models:Lookahead", "--input-size", "3,6", "--causal", "--positions", "4"]
    argv += ["--format", "json"]
    assert main(argv) == 1
    (finding,) = json.loads(capsys.readouterr().out)["causal"]
    assert (finding["layer"], finding["batch"]) == ("attn", 4) and "later position(s) 5:" in finding["note"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--input-size", "1,6"], "--input-size 1,6: a leak needs other samples to come from"),
        (["--input-size", "3,6", "--samples", "a"], "--samples 'a': expected comma-separated indices"),
        (["--input-size", "3,6", "--output", "logits"], "--output 'logits': not a key or attribute"),
        (["--input-size", "3,6", "--batch-dim", "x"], "--batch-dim 'x': expected a dimension, an integer"),
        (["--input-size", "3,6", "--batch-dim", "2"], "--batch-dim 2: the input 3,6 has dimensions 0 to 1"),
        (["--input-size", "3,1", "--batch-dim", "-1"], "a batch of 2 or more along dimension 1"),
        (["--batch-dim", "1"], "--batch-dim 1: needs the --input-size it is a dimension of"),
        (
            ["--input-size", "3,6", "--causal", "--seq-dim", "0"],
            "--seq-dim 0: the same dimension as the batch's",
        ),
    ],
)
def test_leaks_bad_arguments_exit_2(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["leaks", "cli_models:Lookahead", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


UNSEEDED = """
import torch
from torch import nn

def fresh():
    # no seed of its own: its weights are whatever torch's RNG holds when it is built
    layers = [nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)]
    return nn.Sequential(*layers)
"""


def test_health_gives_the_same_numbers_every_run_and_a_random_seed_is_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "unseeded.py").write_text(UNSEEDED)
    argv = ["health", "unseeded:fresh", "--input-size", "4,3,8,8", "--format", "json"]
    runs = []
    for _ in range(2):
        torch.manual_seed(len(runs) + 1)  # whatever state the process is in
        main(argv)
        runs.append(json.loads(capsys.readouterr().out))
    assert runs[0] == runs[1]  # torch is seeded (0) before the factory builds the model
    main([*argv, "--seed", "1"])
    assert json.loads(capsys.readouterr().out) != runs[0]
    main([*argv, "--seed", "random"])
    captured = capsys.readouterr()
    seed = int(captured.err.split("seed: ")[1].split()[0])
    assert f"(rerun with --seed {seed})" in captured.err
    main([*argv, "--seed", str(seed)])
    assert json.loads(capsys.readouterr().out) == json.loads(captured.out)


@pytest.mark.parametrize(
    ("argv", "usage", "message"),
    [
        (
            ["sizes", "cli_models:small", "--modules", "nothing*"],
            "sizes",
            "--modules='nothing*' matches no module",
        ),
        (
            ["health", "cli_models:small", "--input-size", "2,3,8,8", "--modules", "conv"],
            "health",
            "--modules",
        ),
        (
            ["leaks", "cli_models:small", "--input-size", "2,3,8,8", "--seed", "soon"],
            "leaks",
            "--seed 'soon'",
        ),
        (
            ["leaks", "cli_models:small", "--input-size", "2,3,8,8", "--output", "logit"],
            "leaks",
            "--output 'logit': not a key or attribute of the model's output (the model returned a tensor",
        ),
    ],
)
def test_usage_errors_exit_2_with_the_subcommands_usage(
    argv: list[str], usage: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: python -m pytest_modelhooks {usage} ") and message in err


def test_json_shapes_stay_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sizes", "cli_models:small", "--size", "16x16", "--format", "json"]) == 0
    out = capsys.readouterr().out
    assert '"calls": [\n      [1, 8, 14, 14]\n    ]' in out
    assert json.loads(out)["0"]["calls"] == [[1, 8, 14, 14]]
    with pytest.raises(SystemExit):
        main(["sizes", "--help"])
    assert "64,64 (or 64x64)" in capsys.readouterr().out  # the x form is documented


GATED = """
from torch import nn

class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.gate = nn.Linear(8, 8), nn.Linear(8, 8)
        nn.init.normal_(self.gate.weight, std=1e-4)  # small by design, not zero
        nn.init.zeros_(self.gate.bias)
    def forward(self, x):
        return self.body(x) + self.gate(x)
"""


def test_health_exclude_exempts_a_layer_small_by_design(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "gated.py").write_text(GATED)
    argv = ["health", "gated:Gated", "--input-size", "8,8", "--std", "0.01,10"]
    assert main(argv) == 1
    assert "gate " in capsys.readouterr().out
    assert main([*argv, "--exclude", "gate"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--exclude", "nothing"])
    assert exit_info.value.code == 2 and "--exclude='nothing' matches no module" in capsys.readouterr().err


NANOGPT_LIKE = """
import torch
from torch import nn

class GPT(nn.Module):
    # nanoGPT's forward signature: targets= beside the tokens, a loss when given
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 20)
    def forward(self, idx, targets=None, causal=True):
        x = self.embed(idx)
        n = idx.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool).triu(1) if causal else None
        logits = self.head(self.attn(x, x, x, attn_mask=mask, need_weights=False)[0])
        if targets is None:
            return logits
        return logits, nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
"""


def test_forward_keywords_reach_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "gpt.py").write_text(NANOGPT_LIKE)
    assert main(["leaks", "gpt:GPT", "--input-size", "3,8", "--causal", "--kwarg", "targets=None"]) == 0
    assert main(["leaks", "gpt:GPT", "--input-size", "3,8", "--causal", "--kwarg", "causal=False"]) == 1
    capsys.readouterr()
    assert (
        main(["sizes", "gpt:GPT", "--input-size", "2,5", "--kwarg", "causal=False", "--format", "json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["head"]["calls"] == [[2, 5, 20]]
    for bad in ("causal", "1x=2", "causal=yes please"):
        with pytest.raises(SystemExit) as exit_info:
            main(["sizes", "gpt:GPT", "--input-size", "2,5", "--kwarg", bad])
        assert exit_info.value.code == 2 and "--kwarg" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sizes", "gpt:GPT", "--size", "5", "--input-size", "2,5"])
    assert "--size and --input-size: give one" in capsys.readouterr().err


def test_memory_prints_the_report_and_judges_the_budget(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["memory", "cli_models:small", "--input-size", "4,3,16,16"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("Sequential training step, adamw, input 4x3x16x16 float32: peak ")
    assert "Conv2d" in out and "saved for backward" in out
    assert main([*argv, "--budget", "1KiB"]) == 1
    assert "over budget: peak " in capsys.readouterr().out
    assert main([*argv, "--budget", "1GiB", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["peak_bytes"] < 2**30 and data["optimizer"] == "adamw"
    assert main([*argv, "--format", "markdown", "--optimizer", "none", "--allocator", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "forward and backward" in out and "| total |" not in out and "| **total** |" in out


def test_memory_matches_the_library_and_finds_the_largest_batch(capsys: pytest.CaptureFixture[str]) -> None:
    import cli_models  # type: ignore[import-not-found]

    from pytest_modelhooks.memory import max_batch_size, model_memory

    model = cli_models.small()
    assert main(["memory", "cli_models:small", "--input-size", "4,3,16,16", "--format", "json"]) == 0
    assert (
        json.loads(capsys.readouterr().out)["peak_bytes"]
        == model_memory(model, input_size=(4, 3, 16, 16)).peak_bytes
    )
    assert (
        main(["memory", "cli_models:small", "--input-size", "1,3,16,16", "--budget", "2MiB", "--max-batch"])
        == 0
    )
    fit = max_batch_size(model, lambda batch: torch.rand(batch, 3, 16, 16), "2MiB")
    assert capsys.readouterr().out.startswith(f"batch {fit.batch_size} fits 2.0 MiB")


def test_memory_builds_a_big_model_on_meta(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["memory", "cli_models:Big", "--input-size", "8,4096", "--meta", "--autocast", "bf16"]) == 0
    assert "autocast bfloat16" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--budget", "lots"], "--budget 'lots': expected a size such as 24GiB"),
        (["--max-batch"], "--max-batch needs --budget"),
        (["--autocast", "int8"], "--autocast 'int8': expected one of bf16"),
    ],
)
def test_memory_bad_arguments_exit_2(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["memory", "cli_models:small", "--input-size", "4,3,16,16", *extra])
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


BREAKING = """
import torch
from torch import nn

class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
    def forward(self, x):
        y = self.proj(x)
        if y.mean() > 0:
            y = torch.relu(y)
        return y

def gated():
    return nn.Sequential(nn.Linear(4, 4), Gate())
"""


def test_compile_names_the_break_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "breaking.py").write_text(BREAKING)
    assert main(["compile", "breaking:gated", "--input-size", "2,4"]) == 1
    out = capsys.readouterr().out
    assert "graph break(s) in 1 place(s), 0 allowed" in out and "1      Gate" in out
    assert "breaking.py:" in out and "if y.mean() > 0:" in out
    assert main(["compile", "breaking:gated", "--input-size", "2,4", "--max-graph-breaks", "10"]) == 0
    capsys.readouterr()
    assert main(["compile", "cli_models:small", "--input-size", "2,3,8,8", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["graph_breaks"] == 0


def test_compile_lists_recompilations_over_several_sizes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "breaking.py").write_text(BREAKING)
    sizes = ["--input-size", "2,3,8,8", "--input-size", "5,3,8,8"]
    assert main(["compile", "cli_models:small", *sizes]) == 0  # recompilations: not bounded by default
    out = capsys.readouterr().out
    assert "1 recompilation(s) over the inputs 2,3,8,8; 5,3,8,8" in out
    assert "size mismatch at index 0. expected 2, actual 5" in out
    assert main(["compile", "cli_models:small", *sizes, "--max-recompiles", "0"]) == 1
    capsys.readouterr()
    assert main(["compile", "cli_models:small", *sizes, "--dynamic", "batch", "--max-recompiles", "0"]) == 0
    assert "No recompilation over the inputs" in capsys.readouterr().out
    assert main(["compile", "cli_models:small", *sizes, "--format", "json", "--max-recompiles", "0"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["recompiles"] == 1 and data["recompilations"][0]["batch"] == 1


def test_compile_export_and_onnx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "breaking.py").write_text(BREAKING)
    assert (
        main(["compile", "breaking:gated", "--input-size", "2,4", "--export", "--max-graph-breaks", "5"]) == 1
    )
    out = capsys.readouterr().out
    assert "torch.export: 1 problem(s):" in out and "not exportable" in out and "if y.mean() > 0:" in out
    size = ["--input-size", "2,3,8,8", "--dynamic", "batch", "--export"]
    assert main(["compile", "cli_models:small", *size]) == 0
    assert (
        "torch.export: exports, and agrees with eager at 2,3,8,8 and at twice the batch."
        in capsys.readouterr().out
    )
    if all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime")):
        assert (
            main(["compile", "cli_models:small", "--input-size", "2,3,8,8", "--onnx", "--format", "json"])
            == 0
        )
        assert json.loads(capsys.readouterr().out)["export_onnx"] == []


def test_compile_bad_allowance_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["compile", "cli_models:small", "--input-size", "2,3,8,8", "--max-graph-breaks", "-1"])
    assert raised.value.code == 2
    assert "--max-graph-breaks '-1': expected a non-negative integer" in capsys.readouterr().err


STATE_MODELS = """
from torch import nn

def old():
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))

def renamed():
    model = nn.Module()
    model.proj = nn.Linear(4, 8)
    model.norm = nn.LayerNorm(8)
    return model
"""


def test_state_dict_prints_the_keys_and_checks_a_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    (tmp_path / "state_models.py").write_text(STATE_MODELS)
    assert main(["state-dict", "state_models:old"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("State dict: 4 keys, 56 values") and "0.weight  parameter  (8, 4)" in out
    assert main(["state-dict", "state_models:old", "--meta", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["key"] == "0.weight"
    from state_models import old

    torch.save({"model": old().state_dict(), "step": 10}, tmp_path / "old.pt")
    assert main(["state-dict", "state_models:old", "--checkpoint", "old.pt"]) == 0
    assert "old.pt loads into Sequential: 4 keys" in capsys.readouterr().out
    assert main(["state-dict", "state_models:renamed", "--checkpoint", "old.pt"]) == 1
    out = capsys.readouterr().out
    assert (
        "would not load into Module as saved: 8 problem(s)" in out
        and "renamed? the checkpoint has 0.weight" in out
    )
    assert main(["state-dict", "state_models:renamed", "--checkpoint", "old.pt", "--no-strict"]) == 1
    assert "silently skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit) as raised:
        main(["state-dict", "state_models:old", "--checkpoint", "missing.pt"])
    assert raised.value.code == 2
    assert "--checkpoint 'missing.pt': checkpoint 'missing.pt': no such file" in capsys.readouterr().err


DIVERGING = """
import torch
from torch import nn

class HalfScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
    def forward(self, x):
        y = self.proj(x)
        if y.dtype != torch.float32:
            return (y.half() * 1e5).float()
        return y * 1e5

def scaled():
    return nn.Sequential(nn.Linear(4, 4), HalfScale(), nn.Linear(4, 2))
"""


def test_diverge_names_the_layer_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "diverging.py").write_text(DIVERGING)
    assert main(["diverge", "diverging:scaled", "--input-size", "8,4", "--against", "bf16"]) == 1
    out = capsys.readouterr().out
    assert "Sequential and its bf16 run part at 1 (HalfScale)" in out
    assert main(["diverge", "cli_models:small", "--input-size", "2,3,8,8", "--against", "channels_last"]) == 0
    assert "agrees with its channels_last run at every module" in capsys.readouterr().out
    assert (
        main(["diverge", "diverging:scaled", "--input-size", "8,4", "--against", "bf16", "--format", "json"])
        == 1
    )
    assert json.loads(capsys.readouterr().out)["divergences"][0]["layer"] == "1"
    assert main(["diverge", "diverging:scaled", "--input-size", "8,4", "--fingerprints"]) == 0
    assert capsys.readouterr().out.startswith("Fingerprints: 5 calls")  # the model, 3 layers, 1.proj
    with pytest.raises(SystemExit) as raised:
        main(["diverge", "diverging:scaled", "--input-size", "8,4"])
    assert raised.value.code == 2
    assert "--against is needed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "made"),
    [("health", "16,3,64,64"), ("leaks", "5,3,64,64"), ("compile", "2,3,64,64"), ("diverge", "2,3,64,64")],
)
def test_without_an_input_size_the_batch_is_shaped_from_the_first_layer(
    command: str, made: str, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = ["--against", "bf16", "--format", "json"] if command == "diverge" else []
    status = main([command, "cli_models:small", *extra])
    out, err = capsys.readouterr()
    # (leaks: 3 is the image's channels, so the batch is the next size no dimension has)
    said = f"modelhooks {command}: no --input-size given; a batch of {made} from the first layer '0' (Conv2d)"
    assert err == said + "\n"
    assert main([command, "cli_models:small", "--input-size", made, *extra]) == status
    assert capsys.readouterr().out == out  # the same seeded batch as when given


@pytest.mark.parametrize(
    ("factory", "layer", "made", "source"),
    [
        (
            "strided",
            "0",
            "2,3,224,224",
            "as the forward refused 64x64 (layer '2' (Conv2d, in_channels=8) got input (1, 8, 1, 1))",
        ),
        ("Patches", "proj", "2,3,32,32", "the size its image_size gives"),
        (
            "Audio",
            "convs.0",
            "2,3000",
            "a waveform (the forward adds its channel), as the forward refused 64 "
            "(layer 'convs.2' (Conv1d, in_channels=4) got input (1, 4, 1))",
        ),
    ],
)
def test_a_made_batch_is_as_large_as_the_model_needs_and_says_why(
    factory: str, layer: str, made: str, source: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compile", f"cli_models:{factory}", "--format", "json"]) == 0
    kind = "Conv1d" if factory == "Audio" else "Conv2d"
    said = f"a batch of {made} from the first layer '{layer}' ({kind}), {source}"
    assert capsys.readouterr().err == f"modelhooks compile: no --input-size given; {said}\n"
    assert main(["summary", f"cli_models:{factory}", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["input_shapes"] == [1, *map(int, made.split(",")[1:])]


@pytest.mark.parametrize(
    ("factory", "said"),
    [
        (
            "BlockSize()",
            "AssertionError: sequence of length 8, block size is only 4 (at {path}:{line} in forward)",
        ),
        (
            "BlockSize(said=False)",
            "AssertionError (at {path}:{line} in forward: assert tokens.shape[1] <= 4)",
        ),
    ],
)
def test_a_models_assertion_is_an_error_line_naming_where_it_failed(
    factory: str, said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = (tmp_path / "cli_models.py").read_text().splitlines()
    bare = "assert tokens.shape[1] <= 4"
    line = next(
        number
        for number, text in enumerate(source, 1)
        if (text.strip().startswith(bare + ",") if factory == "BlockSize()" else text.strip() == bare)
    )
    assert main(["health", f"cli_models:{factory}", "--input-size", "2,8"]) == 1
    path = tmp_path / "cli_models.py"
    assert capsys.readouterr().err == "error: " + said.format(path=path, line=line) + "\n"


@pytest.mark.parametrize(("command", "batch"), [("health", 16), ("leaks", 3), ("compile", 2), ("diverge", 2)])
def test_an_encoder_decoder_is_given_decoder_ids_for_its_batch(
    command: str, batch: int, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = ["--against", "bf16"] if command == "diverge" else []
    assert main([command, "cli_models:Seq2Seq", *extra]) == 0
    lines = capsys.readouterr().err.splitlines()
    made = f"a batch of {batch},8 from the first layer 'embed' (Embedding)"
    assert lines == [
        f"modelhooks {command}: no --input-size given; {made}",
        f"modelhooks {command}: decoder_input_ids of {batch},8 for the encoder-decoder's decoder",
    ]
    assert main(["summary", "cli_models:Seq2Seq", "--input-size", "4,6", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["input_shapes"] == [[4, 6], {"decoder_input_ids": [4, 8]}]
    # a --kwarg for the decoder is the user's own, as given
    assert (
        main(["health", "cli_models:Seq2Seq", "--input-size", "4,8", "--kwarg", "decoder_input_ids=None"])
        == 1
    )
    assert "specify either decoder_input_ids" in capsys.readouterr().err


def test_an_encoder_decoder_compiled_at_two_batch_sizes_gets_decoder_ids_for_each(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["compile", "cli_models:Seq2Seq", "--input-size", "2,6", "--input-size", "3,6", "--format", "json"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        "modelhooks compile: decoder_input_ids of 2,8 for the encoder-decoder's decoder",
        "modelhooks compile: decoder_input_ids of 3,8 for the later inputs' batches",
    ]
    found = json.loads(out)
    assert found["graph_breaks"] == 0
    # the second call recompiles for its batch, decoder ids included, and runs
    (again,) = found["recompilations"]
    assert again["batch"] == 1
    assert "(3, 6)" in again["note"] and "(3, 8)" in again["note"]


def test_a_made_batch_is_laid_out_as_a_sequence_first_rnn_reads_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["leaks", "torch.nn:LSTM(4, 8)"]) == 0  # batch second, checked along it
    out, err = capsys.readouterr()
    assert "a batch of 8,3,4 from the model (LSTM)" in err
    assert out.strip() == "No leaks: LSTM is batch independent on a 8,3,4 input."
    assert main(["leaks", "torch.nn:LSTM(4, 8)", "--input-size", "3,6,4"]) == 1  # given: batch first
    assert "an RNN without batch_first=True" in capsys.readouterr().out


def test_batch_and_sequence_dimensions_of_a_given_input(capsys: pytest.CaptureFixture[str]) -> None:
    # a sequence-first LSTM on a (length, batch, features) input: independent along its batch
    assert main(["leaks", "torch.nn:LSTM(4, 8)", "--input-size", "6,3,4", "--batch-dim", "1"]) == 0
    assert capsys.readouterr().out.strip() == "No leaks: LSTM is batch independent on a 6,3,4 input."
    # (causal along the sequence, dimension 0 once the batch is 1)
    argv = ["leaks", "torch.nn:LSTM(4, 8)", "--input-size", "6,3,4", "--batch-dim", "1", "--causal"]
    assert main(argv) == 0
    # a bidirectional one sees later positions; named with the sequence given explicitly
    argv = ["leaks", "torch.nn:LSTM(4, 8, bidirectional=True)", "--input-size", "6,3,4"]
    assert main([*argv, "--batch-dim", "1", "--seq-dim", "0", "--causal"]) == 1
    assert "Outputs depend on later positions" in capsys.readouterr().out


def test_a_made_batch_for_a_token_model_is_ids_and_finds_the_look_ahead(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["leaks", "cli_models:Lookahead", "--causal"]) == 1
    out, err = capsys.readouterr()
    assert "a batch of 3,8 from the first layer 'embed' (Embedding)" in err
    assert out.splitlines()[0] == "Outputs depend on later positions (1):"
    assert main(["leaks", "cli_models:Lookahead(masked=True)", "--causal"]) == 0


def test_a_model_without_a_layer_to_read_the_input_from_needs_an_input_size(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["leaks", "cli_models:Doubles"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--input-size is needed: cannot tell the input of Doubles: it has no layer with parameters" in err
    assert "model_sizes(" not in err
