from __future__ import annotations

import torch
from torch import nn

from pytest_modelhooks import GradientStats, model_sizes, model_summary
from pytest_modelhooks.snapshot import ModelSnapshotExtension, _numbers_close, describe_changes, snapshot_text


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
        match="stores ModelSummary, LayerSizes, ActivationStats, GradientStats or str, got int",
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
