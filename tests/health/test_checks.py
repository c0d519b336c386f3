from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from pytest_modelhooks import ActivationStats, Finding, GradientStats, HealthError
from pytest_modelhooks.findings import format_findings, raise_for
from tests import zoo


@pytest.fixture(scope="module")
def stats() -> ActivationStats:
    model = zoo.mlp()
    with ActivationStats(model) as recorded:
        model(torch.randn(4, 20))
    return recorded


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"std": (5.0, 1.0)}, r"std must be a \(low, high\) pair with low <= high, got std=\(5.0, 1.0\)"),
        ({"std": 3.0}, r"std must be a \(low, high\) pair"),
        ({"max_dead": 1.5}, r"max_dead must be a fraction in \[0, 1\], got max_dead=1.5"),
        ({"max_near_zero": -0.1}, r"max_near_zero must be a fraction in \[0, 1\], got max_near_zero=-0.1"),
        ({"max_std_growth": 0}, r"max_std_growth must be > 0, got max_std_growth=0"),
        # not numbers: named, not a TypeError from a comparison deep inside
        ({"std": (0.1, "5")}, r"std must be a \(low, high\) pair with low <= high, got std=\(0.1, '5'\)"),
        ({"std": (math.nan, 5.0)}, r"std must be a \(low, high\) pair"),
        ({"max_dead": "0.3"}, r"max_dead must be a fraction in \[0, 1\], got max_dead='0.3'"),
        ({"max_near_zero": True}, r"max_near_zero must be a fraction in \[0, 1\], got max_near_zero=True"),
        ({"max_std_growth": "2"}, r"max_std_growth must be > 0, got max_std_growth='2'"),
    ],
)
def test_bad_bounds_name_the_argument(stats: ActivationStats, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        stats.check(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"max_norm": -1.0},
            r"max_norm must be a non-negative number \(a gradient norm\), got max_norm=-1.0",
        ),
        (
            {"min_norm": "1e-6"},
            r"min_norm must be a non-negative number \(a gradient norm\), got min_norm='1e-6'",
        ),
        ({"max_norm": math.nan}, r"max_norm must be a non-negative number"),
        ({"max_norm": 1.0, "min_norm": 2.0}, r"min_norm=2.0 is above max_norm=1.0"),
    ],
)
def test_bad_gradient_bounds_name_the_argument(kwargs: dict[str, Any], match: str) -> None:
    model = zoo.mlp()
    with GradientStats(model) as grads:
        model(torch.randn(4, 20)).sum().backward()
    with pytest.raises(ValueError, match=match):
        grads.check(**kwargs)
    grads.check(max_norm=math.inf, min_norm=0, require_grad=False)  # the widest bounds are bounds


def test_a_healthy_record_raises_nothing(stats: ActivationStats) -> None:
    assert stats.findings() == []
    stats.check()


def test_the_message_is_a_table_of_every_finding() -> None:
    findings = [
        Finding("encoder.conv1", "Conv2d", "std", 12.5, "<= 5", 3, "exploding"),
        Finding("head", "Linear", "dead", 0.75, "<= 0.3", None, "6 of 8 channels never active"),
    ]
    with pytest.raises(HealthError) as info:
        raise_for(findings, "activation")
    lines = str(info.value).splitlines()
    assert lines[0] == "activation health check failed: 2 finding(s) in 2 layer(s)"
    assert lines[1].split() == ["layer", "type", "statistic", "observed", "bound", "batch", "note"]
    assert lines[2].split() == ["encoder.conv1", "Conv2d", "std", "12.5", "<=", "5", "3", "exploding"]
    assert lines[3].split()[:6] == ["head", "Linear", "dead", "0.75", "<=", "0.3"]
    assert info.value.findings == findings
    assert isinstance(info.value, AssertionError)
    assert "step" in format_findings(findings, unit="step").splitlines()[0]
    assert str(findings[0]) == "encoder.conv1 (Conv2d): std 12.5, bound <= 5 at batch 3 (exploding)"


def test_a_finding_with_no_number_shows_a_dash_not_nan() -> None:
    unchanged = Finding("head.weight", "parameter 2x8", "update", math.nan, "a change", None, "left out")
    row = format_findings([unchanged]).splitlines()[1].split()
    assert row[:6] == ["head.weight", "parameter", "2x8", "update", "-", "a"]
    assert str(unchanged) == "head.weight (parameter 2x8): update -, bound a change (left out)"


def test_a_check_of_nothing_recorded_fails_and_says_why() -> None:
    # a test that forgot to run the model inside the block must not pass vacuously, whether it
    # calls check() or asserts on findings()
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with ActivationStats(model) as stats:
        pass
    (finding,) = stats.findings()
    assert (finding.layer, finding.layer_type, finding.statistic, finding.observed) == (
        "",
        "Sequential",
        "batches",
        0,
    )
    with pytest.raises(HealthError, match=r"no batch was recorded: Sequential's forward did not run"):
        stats.check()
    with ActivationStats(model, train_only=True) as stats:
        model.eval()(torch.randn(2, 4))
    with pytest.raises(HealthError, match="train_only=True and the model ran only in eval mode"):
        stats.check()
    with GradientStats(model) as grads:
        model(torch.randn(2, 4))  # no backward
    (finding,) = grads.findings()  # one finding, not every parameter "unused"
    assert finding.statistic == "steps" and "no loss.backward() inside the `with` block" in finding.note
    with pytest.raises(
        HealthError, match=r"\(model\)\s+Sequential\s+steps.*\(2 parameter\(s\) require grad\)"
    ):
        grads.check()
    # an exported graph runs its submodules' operations inline: the forward ran, they did not
    exported = torch.export.export(model, (torch.randn(2, 4),)).module()
    with ActivationStats(exported) as stats:
        exported(torch.randn(2, 4))
    none_ran = r"forward ran, but none of the hooked modules \(0\) did.*torch.export"
    with pytest.raises(HealthError, match=none_ran):
        stats.check()
    compiled = torch.compile(model)  # (not called: nothing compiles)
    with pytest.warns(UserWarning, match="torch.compile'd model"), ActivationStats(compiled) as stats:
        pass
    with pytest.raises(HealthError, match=r"the model is torch.compile'd.*model._orig_mod"):
        stats.check()
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with GradientStats(frozen) as grads:
        pass
    with pytest.raises(HealthError, match="no parameter requires grad"):
        grads.check()


class DictHead(nn.Module):
    """Returns its logits inside a dict, as Hugging Face models do."""

    def __init__(self, hidden: nn.Linear, head: nn.Linear) -> None:
        super().__init__()
        self.hidden, self.head = hidden, head

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.head(torch.relu(self.hidden(x)))}


def _negative_for_half(layer: nn.Linear) -> nn.Linear:
    with torch.no_grad():
        layer.bias[: layer.out_features // 2] = -100.0  # never above zero on any sample
    return layer


@pytest.mark.parametrize("wrap", ["sequential", "dict"])
def test_dead_units_are_not_judged_on_what_the_model_returns(wrap: str) -> None:
    # logits negative for every sample of a class are an answer, not dead units; the same
    # values in a hidden layer (read through a ReLU) are dead
    torch.manual_seed(0)
    hidden = _negative_for_half(nn.Linear(6, 8))
    head = _negative_for_half(nn.Linear(8, 10))
    model: nn.Module
    if wrap == "sequential":
        model = nn.Sequential(hidden, nn.ReLU(), head)
        names = {"hidden": "0", "head": "2", "model": ""}
        judged = ["0", "1"]  # the hidden Linear and its ReLU
    else:
        model = DictHead(hidden, head)
        names = {"hidden": "hidden", "head": "head", "model": "logits"}
        judged = ["hidden"]
    with ActivationStats(model, modules="all") as stats:
        model(torch.randn(16, 6))
    head_stats = stats[names["head"]]
    assert head_stats.dead >= 0.5 and head_stats.model_output and stats[names["model"]].model_output
    assert (
        not stats[names["hidden"]].model_output and stats[names["hidden"]].to_dict()["model_output"] is False
    )
    dead = [finding.layer for finding in stats.findings(max_dead=0.3) if finding.statistic == "dead"]
    assert dead == judged


def test_std_growth_is_not_judged_after_a_constant_layer() -> None:
    # a residual block whose last BatchNorm starts at zero (zero_init_residual), a common recipe
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 8))
    nn.init.zeros_(model[1].weight)
    with ActivationStats(model) as stats:
        model(torch.randn(16, 8))
    assert float(stats["1"].std[0]) == 0.0
    assert stats.findings(max_std_growth=10.0) == []


class LlamaRMSNorm(nn.Module):
    """Named as transformers names its own norm classes (not an nn subclass)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("norm", [nn.LayerNorm(16), LlamaRMSNorm(16), nn.BatchNorm1d(16)])
def test_std_growth_into_a_normalization_layer_is_not_an_explosion(norm: nn.Module) -> None:
    # a transformer's residual branch starts small (init std 0.02) and its norm rescales it to ~1
    torch.manual_seed(0)
    branch = nn.Linear(16, 16)
    nn.init.normal_(branch.weight, std=0.002)
    nn.init.zeros_(branch.bias)
    model = nn.Sequential(branch, norm, nn.Linear(16, 16))
    with ActivationStats(model) as stats:
        model(torch.randn(32, 16))
    assert float(stats["1"].std[0]) / float(stats["0"].std[0]) > 100
    assert stats.findings(max_std_growth=10.0) == []
    with torch.no_grad():
        model[2].weight.mul_(1000)  # growth out of the norm is still judged
    with ActivationStats(model) as stats:
        model(torch.randn(32, 16))
    assert [(f.layer, f.note) for f in stats.findings(max_std_growth=10.0)] == [("2", "vs 1")]


def test_a_rectified_model_output_is_still_judged_for_dead_units() -> None:
    # a feature extractor ending in a ReLU: its zero channels are dead, output or not
    torch.manual_seed(0)
    model = nn.Sequential(_negative_for_half(nn.Linear(6, 8)), nn.ReLU())
    with ActivationStats(model, modules="all") as stats:
        model(torch.randn(16, 6))
    assert stats["1"].model_output and stats["0"].model_output is False
    dead = [finding.layer for finding in stats.findings(max_dead=0.3) if finding.statistic == "dead"]
    # the Linear and its ReLU; the model's output is the ReLU's very tensor, judged once, there
    assert dead == ["0", "1"] and stats[""].same_as == "1"


class AdaLNZero(nn.Module):
    """DiT's block in small: its modulation starts at zero (adaLN-Zero), so at init the block is
    the identity, its modulation's output is exactly 0, and the MLP behind the gate gets no
    gradient: by design."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(c).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class DiTLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([AdaLNZero(), AdaLNZero()])
        self.head = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, h)
        return self.head(h)


def test_zero_initialised_layers_are_not_vanishing_and_what_they_gate_gets_no_gradient() -> None:
    torch.manual_seed(0)
    model = DiTLike()
    with ActivationStats(model) as stats, GradientStats(model) as grads:
        model(torch.randn(8, 8)).square().mean().backward()
    assert float(stats["blocks.0.ada.1"].std[0]) == 0.0
    assert stats.findings(std=(0.01, 10.0), max_near_zero=0.5) == []  # adaLN-Zero, by design
    gated = grads.findings(min_norm=1e-8, require_update=False)
    assert {f.layer.split(".")[2] for f in gated} == {"mlp"}  # no gradient behind a zero gate
    assert grads.findings(min_norm=1e-8, require_update=False, exclude="blocks.*.mlp") == []
    with pytest.raises(ValueError, match=r"exclude='nothing' matches no module of DiTLike"):
        stats.findings(exclude="nothing")


class PositionBias(nn.Module):
    """transformers' Swin: a relative-position bias table, zero at init, called with nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(7, 2))

    def forward(self) -> torch.Tensor:
        return self.table[torch.arange(16).remainder(7)]


class ZeroByDesign(nn.Module):
    """The recipes that start a layer at (or near) zero, each beside a residual path."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(16, 16)
        self.lora_a, self.lora_b = nn.Linear(16, 4, bias=False), nn.Linear(4, 16, bias=False)
        nn.init.zeros_(self.lora_b.weight)  # LoRA: B starts at zero
        self.layer_scale = nn.Linear(16, 16, bias=False)
        with torch.no_grad():
            self.layer_scale.weight.copy_(torch.eye(16) * 1e-6)  # LayerScale's 1e-6
        self.dropped = nn.Dropout(0.0)  # behind a zero layer, no weights of its own
        self.bias, self.head = PositionBias(), nn.Linear(16, 10)
        nn.init.zeros_(self.head.weight)  # torchvision's ViT: a zero head
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        h = h + self.dropped(self.lora_b(self.lora_a(x))) + self.layer_scale(h)
        return self.head(h + self.bias().sum(-1))


def test_zero_initialised_layers_are_not_judged_vanishing() -> None:
    torch.manual_seed(0)
    model = ZeroByDesign()
    with ActivationStats(model, modules="all") as stats:
        model(torch.randn(16, 16))
    small = ["lora_b", "layer_scale", "dropped", "bias", "head"]
    assert all(float(stats[name].std[0]) < 1e-5 for name in small)
    assert stats.findings(std=(0.001, 50.0), max_dead=0.8, max_near_zero=0.9) == []


def test_a_layer_a_zero_layer_cuts_off_is_named_with_it() -> None:
    # no residual path: the zero layer is the recipe's, the silence after it is not
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 8), nn.Linear(8, 8, bias=False), nn.ReLU(), nn.Linear(8, 4, bias=False)
    )
    nn.init.zeros_(model[0].weight)
    nn.init.zeros_(model[0].bias)
    with ActivationStats(model) as stats:
        model(torch.randn(16, 8))
    found = stats.findings(std=(0.001, 50.0))
    assert [f.layer for f in found] == ["1", "3"]  # the ReLU after "1": fed by a judged layer
    assert found[0].note == "vanishing: fed by '0', whose weights are ~0 (zero-initialised)"
    with torch.no_grad():
        model[0].weight.fill_(1e-3)  # small, but not zero: judged
    with ActivationStats(model) as stats:
        model(torch.randn(16, 8))
    assert [f.layer for f in stats.findings(std=(0.01, 50.0))][:1] == ["0"]


def test_an_exempt_layer_is_still_judged_for_non_finite_values() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].bias[0] = math.inf
    with ActivationStats(model) as stats:
        model(torch.randn(3, 4))
    assert [f.statistic for f in stats.findings(exclude="0")][:1] == ["nonfinite"]


def test_dead_units_are_judged_only_where_values_are_rectified() -> None:
    # squeeze-excitation as EfficientNet builds it: fc1 -> SiLU -> fc2 -> sigmoid; negative
    # values there are answers, not dead units
    class Excite(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(8, 4), nn.SiLU(), nn.Linear(4, 8)
            self.gate = nn.Sigmoid()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.gate(self.fc2(self.act(self.fc1(x))))

    dead = nn.Linear(8, 4)
    nn.init.constant_(dead.bias, -100.0)  # never above zero
    excite = Excite()
    nn.init.constant_(excite.fc1.bias, -100.0)
    nn.init.constant_(excite.fc2.bias, -100.0)
    model = nn.Sequential(excite, dead, nn.ReLU(), nn.Linear(4, 2))
    with ActivationStats(model) as stats:
        model(torch.randn(16, 8))
    assert stats["0.fc1"].dead == 1.0 and not stats["0.fc1"].rectified  # recorded...
    assert stats["1"].rectified  # a ReLU module reads it
    found = stats.findings(max_dead=0.5)
    assert [f.layer for f in found] == ["1"]  # ...but judged only where a ReLU reads it


def test_a_rectified_output_is_judged_and_a_plain_one_is_not() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.conv(x).clamp(min=0))  # rectified, without a ReLU module

    model = Net()
    nn.init.constant_(model.conv.bias, -100.0)
    nn.init.constant_(model.head.bias, -100.0)
    with ActivationStats(model, modules="all") as stats:
        model(torch.randn(2, 3, 8, 8))
    # conv's own output goes negative (not judged); head's logits too; nothing is rectified
    assert stats.findings(max_dead=0.5) == []


def test_functional_rectifiers_are_seen_and_leave_nothing_behind() -> None:
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(nn.functional.relu(self.a(x), inplace=True)).sigmoid()

    model = Functional()
    nn.init.constant_(model.a.bias, -100.0)
    nn.init.constant_(model.b.bias, -100.0)
    with ActivationStats(model) as stats:
        model(torch.randn(16, 4))
        model(torch.randn(16, 4))  # the second batch runs without the dispatch mode
    assert stats["a"].rectified and not stats["b"].rectified
    assert [f.layer for f in stats.findings(max_dead=0.5)] == ["a"]

    class Fails(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError(f"broken after {self.a(x).shape}")

    with ActivationStats(Fails()) as failing, pytest.raises(RuntimeError, match="broken"):
        failing.model(torch.randn(2, 4))
    assert _get_current_dispatch_mode() is None  # the mode ended with the failed forward


def test_std_growth_compares_a_layer_with_what_it_was_given_not_another_branch() -> None:
    class TwoBranches(nn.Module):
        """A small-scale conditioning branch runs between a wide layer and its consumer."""

        def __init__(self) -> None:
            super().__init__()
            self.x_proj = nn.Linear(8, 8)
            self.y_embed = nn.Embedding(4, 8)
            self.mix = nn.Linear(8, 8)
            nn.init.normal_(self.y_embed.weight, std=1e-3)  # tiny, by design

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            h = self.x_proj(x)
            c = self.y_embed(y)
            return self.mix(h) + c

    model = TwoBranches()
    with ActivationStats(model, modules="all") as stats:
        model(torch.randn(16, 8), torch.randint(0, 4, (16,)))
    assert stats["mix"].inputs_from == ("x_proj",)  # by identity, not by execution order
    # in execution order mix follows y_embed (std ~1e-3): a ratio of ~500, between branches
    assert stats.findings(max_std_growth=10.0) == []
    with torch.no_grad():
        model.mix.weight.mul_(100.0)
    with ActivationStats(model, modules="all") as grown:
        model(torch.randn(16, 8), torch.randint(0, 4, (16,)))
    found = grown.findings(max_std_growth=10.0)
    assert [(f.layer, f.note) for f in found] == [("mix", "vs x_proj")]


def test_a_norm_given_an_input_smaller_than_its_eps_says_so() -> None:
    def findings(eps: float) -> tuple[torch.Tensor, dict[str, Any]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8, eps=eps))
        nn.init.normal_(model[0].weight, std=5e-5)  # small, not zero-initialised (> 1e-5)
        nn.init.zeros_(model[0].bias)
        x = torch.randn(64, 8)
        with ActivationStats(model.train()) as stats:
            model(x)
        found = {finding.layer: finding for finding in stats.findings(std=(0.01, 10.0))}
        return model[0](x).detach().std(), found

    # input variance ~2e-8 against eps 1e-3: the output's std is ~sqrt(2e-8 / 1e-3) = 0.0045
    std, found = findings(1e-3)
    assert found["0"].note == "vanishing" and found["0"].observed == pytest.approx(float(std), rel=1e-4)
    assert found["1"].note == (
        f"vanishing: its input's std {float(std):.3g} (variance {float(std) ** 2:.2g}) is below the "
        "layer's eps=0.001, which then sets the scale"
    )
    assert list(findings(1e-12)[1]) == ["0"]  # with a small eps the norm brings the scale back
