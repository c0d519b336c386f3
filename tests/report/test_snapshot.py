from __future__ import annotations

import torch
from torch import nn

from pytest_modelhooks import GradientStats, model_sizes, model_summary
from pytest_modelhooks.report.diff import describe_changes
from pytest_modelhooks.report.diff import numbers_close as _numbers_close
from pytest_modelhooks.report.text import snapshot_text
from pytest_modelhooks.snapshot import ModelSnapshotExtension


def net(width: int, extra: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, width, 3), nn.ReLU(), nn.Conv2d(width, 4, 3)]
    if extra:
        layers.append(nn.Flatten())
    return nn.Sequential(*layers)


def test_changes_name_layers_shapes_params_and_totals() -> None:
    old = snapshot_text(model_summary(net(8), (1, 3, 10, 10)))
    new = snapshot_text(model_summary(net(16, extra=True), (1, 3, 10, 10)))
    # conv 0: 3*8*9+8 = 224 -> 448 params; conv 2: 8*4*9+4 = 292 -> 580
    assert describe_changes(old, new) == [
        "~ Sequential: output (1, 4, 6, 6) -> (1, 144); params +512; mult-adds +24.19 K",
        "~ 0 (Conv2d): output (1, 8, 8, 8) -> (1, 16, 8, 8); params +224; mult-adds +13.82 K",
        "~ 1 (ReLU): input (1, 8, 8, 8) -> (1, 16, 8, 8); output (1, 8, 8, 8) -> (1, 16, 8, 8)",
        "~ 2 (Conv2d): input (1, 8, 8, 8) -> (1, 16, 8, 8); params +288; mult-adds +10.37 K",
        "+ 3 (Flatten): added (output (1, 144), params 0)",
        "total params: 516 -> 1,028 (+512)",
        "trainable params: 516 -> 1,028 (+512)",
        "mult-adds: 24,192 -> 48,384 (+24.19 K)",
    ]
    assert "- 3 (Flatten): removed" in describe_changes(new, old)


def test_sizes_changes() -> None:
    old = snapshot_text(model_sizes(net(8), (10, 10)))
    new = snapshot_text(model_sizes(net(8), (12, 12)))
    assert describe_changes(old, new) == [
        "~ 0 (Conv2d): output (1, 8, 8, 8) -> (1, 8, 10, 10)",
        "~ 1 (ReLU): output (1, 8, 8, 8) -> (1, 8, 10, 10)",
        "~ 2 (Conv2d): output (1, 4, 6, 6) -> (1, 4, 8, 8)",
    ]


def test_identical_texts_have_no_changes_and_match_exactly() -> None:
    text = snapshot_text(model_summary(net(8), (1, 3, 10, 10)))
    assert describe_changes(text, text) == []
    assert ModelSnapshotExtension().matches(serialized_data=text, snapshot_data=text)


def test_numbers_close_ignores_alignment_but_not_words() -> None:
    assert _numbers_close("a  1.00  b\n", "a 1.01 b\n", rtol=0.02, atol=0)
    assert not _numbers_close("a  1.00  b\n", "a 1.10 b\n", rtol=0.02, atol=0)
    assert not _numbers_close("a 1 b\n", "c 1 b\n", rtol=1, atol=1)
    assert _numbers_close("x -0.003\n", "x 0.004\n", rtol=0, atol=0.01)
    assert not _numbers_close("x 1\n", "x 1 2\n", rtol=1, atol=1)


def test_snapshot_text_rejects_other_types() -> None:
    import pytest

    with pytest.raises(
        TypeError,
        match="stores ModelSummary, LayerSizes, ActivationStats, GradientStats, MemoryReport, "
        "StateDictSpec, Fingerprints, a list of findings or str, got int",
    ):
        snapshot_text(3)


def test_gradient_snapshots_show_which_parameters_learn_and_how_much() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    model.add_module("spare", nn.Linear(2, 2))  # registered, never used: no gradient
    with GradientStats(model) as grads:
        for _ in range(2):
            model[:3](torch.randn(5, 3)).sum().backward()
            model.zero_grad()
    text = snapshot_text(grads)
    lines = [line.split() for line in text.splitlines()]
    assert lines[0] == ["Gradient", "statistics", "(mean", "over", "2", "steps)"]
    assert lines[1] == ["parameter", "shape", "norm", "max_abs", "nonfinite"]
    norms = grads["0.weight"].norm
    assert lines[2] == ["0.weight", "4x3", f"{float(norms.mean()):.6g}", lines[2][3], "0"]
    assert lines[-1] == ["spare.bias", "2", "-", "-", "no", "gradient"]
    # a parameter that stops learning shows up as a changed row
    frozen = snapshot_text(grads).replace(lines[2][2], "0", 1)
    assert describe_changes(text, frozen)[0].startswith(f"~ 0.weight: norm {lines[2][2]} -> 0")


def test_context_text_lists_every_layer_and_marks_the_findings() -> None:
    from pytest_modelhooks import ActivationStats
    from pytest_modelhooks.report.text import context_text

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(6, 6) for _ in range(12)])
    with torch.no_grad():
        model[7].weight.mul_(1e3)  # layer 7 explodes
    with ActivationStats(model) as stats:
        for _ in range(2):
            model(torch.randn(4, 6))
    marked = {finding.layer for finding in stats.findings(std=(0.0, 50.0))}
    assert "7" in marked
    text = context_text(stats, marked)
    lines = text.splitlines()
    assert lines[0] == (
        "Statistics of every recorded layer over 2 batches (means; min and max the extremes, "
        "nonfinite the total; > marks a finding)"
    )
    header = ["layer", "type", "mean", "std", "near_zero", "dead", "min", "max", "nonfinite"]
    assert lines[1].split() == header
    rows = {line[3:].split()[0]: line for line in lines[2:]}
    assert list(rows) == [str(i) for i in range(12)]
    assert {name for name, line in rows.items() if line.startswith(">")} == marked
    layer = stats["3"]
    assert rows["3"].split() == [
        "3",
        "Linear",
        f"{float(layer.mean.mean()):.4g}",
        f"{float(layer.std.mean()):.4g}",
        f"{float(layer.near_zero.mean()):.4g}",
        f"{layer.dead:.4g}",
        f"{float(layer.min.min()):.4g}",
        f"{float(layer.max.max()):.4g}",
        "0",
    ]
    # a long table keeps the marked rows, their neighbours and both ends
    short = context_text(stats, {"7"}, limit=5, around=1).splitlines()
    assert [line.split()[:3] if "..." in line else line[:6].split() for line in short[2:]] == [
        ["0"],
        ["...", "5", "rows"],
        ["6"],
        [">", "7"],
        ["8"],
        ["...", "2", "rows"],
        ["11"],
    ]
    # the model's own output: findings name it "", the table "(model)"
    with ActivationStats(model, modules="all") as everything:
        model(torch.randn(4, 6))
    assert context_text(everything, {""}).splitlines()[-1].startswith(">  (model)")
    # with nothing marked, nothing is left out
    assert len(context_text(stats, limit=5).splitlines()) == 2 + 12


def test_context_text_of_gradients_names_the_parameters_without_one() -> None:
    from pytest_modelhooks.report.text import context_text

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    model.add_module("spare", nn.Linear(2, 2))
    with GradientStats(model) as grads:
        model[:3](torch.randn(5, 3)).sum().backward()
    lines = context_text(grads, {"spare.weight"}).splitlines()
    assert lines[0] == "Gradients of every tracked parameter over 1 step (> marks a finding)"
    assert lines[-2].split() == [">", "spare.weight", "2x2", "-", "-", "no", "gradient", "no"]
    assert lines[2].split() == [
        "0.weight",
        "4x3",
        f"{float(grads['0.weight'].norm[0]):.4g}",
        f"{float(grads['0.weight'].max_abs[0]):.4g}",
        "0",
        "no",  # no optimizer stepped
    ]
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with GradientStats(model) as grads:
        model[:3](torch.randn(5, 3)).sum().backward()
        optimizer.step()
    updated = {line.split()[0]: line.split()[-1] for line in context_text(grads).splitlines()[2:]}
    assert updated == {"0.weight": "yes", "0.bias": "yes", "2.weight": "no", "2.bias": "no"} | {
        "spare.weight": "no",
        "spare.bias": "no",
    }
    assert context_text(grads).splitlines()[0] == "Gradients of every tracked parameter over 1 step"


def test_a_layer_frozen_by_accident_is_named_in_the_diff() -> None:

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 2))

    before = snapshot_text(model_summary(build(), (1, 3, 8, 8)))
    frozen = build()
    frozen[0].requires_grad_(False)
    after = snapshot_text(model_summary(frozen, (1, 3, 8, 8)))
    changes = describe_changes(before, after)
    assert "~ 0 (Conv2d): trainable -224" in changes
    assert not any(line.startswith("~ 3 ") for line in changes)  # the head still trains all of it
    assert "trainable params: 802 -> 578 (-224)" in changes
    # and back: unfreezing is named too
    assert "~ 0 (Conv2d): trainable +224" in describe_changes(after, before)
