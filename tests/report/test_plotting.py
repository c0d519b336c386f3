from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from tests import zoo

pytest.importorskip("matplotlib")

from pytest_modelhooks import ActivationStats, GradientStats


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture
def recorded() -> ActivationStats:
    model = zoo.mlp()
    with ActivationStats(model, with_hist=True) as stats:
        for _ in range(5):
            model(torch.randn(16, 20))
    return stats


def test_plot_writes_a_png_of_the_expected_size(recorded: ActivationStats, tmp_path: Path) -> None:
    figure = recorded.plot(path=tmp_path / "nested" / "stats.png")
    assert png_size(tmp_path / "nested" / "stats.png") == (1500, 400)  # 3 panels x 5 in, 4 in, 100 dpi
    assert [axis.get_title() for axis in figure.axes] == ["mean", "std", "fraction near zero"]
    assert len(figure.axes[0].lines) == 3  # one line per layer
    two = recorded.plot(["std", "max"], path=tmp_path / "two.png")
    assert png_size(tmp_path / "two.png") == (1000, 400) and len(two.axes) == 2


def test_color_dim_draws_the_histogram_over_batches(recorded: ActivationStats, tmp_path: Path) -> None:
    figure = recorded.color_dim("3", path=tmp_path / "dim.png")
    assert png_size(tmp_path / "dim.png") == (800, 400)
    image = figure.axes[0].images[0].get_array()
    assert image.shape == (80, 5)  # bins x batches


def test_color_dim_zooms_onto_the_values_and_keeps_a_full_range() -> None:
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(1, 1))
    with ActivationStats(model, modules="all", with_hist=True, hist_bins=20) as stats:
        model(torch.tensor([[-0.9], [0.3], [0.95]]))  # bins of 1.0 over (-10, 10)
        model(torch.tensor([[-9.5], [9.5], [0.0]]))
    narrow = ActivationStats(model, modules="all", with_hist=True, hist_bins=20)
    with narrow:
        model(torch.tensor([[-0.9], [0.3], [0.95]]))
    # values in [-1, 1): the bins [-1, 0) and [0, 1), one bin of margin each side
    assert narrow.color_dim("0").axes[0].get_ylim() == pytest.approx((-2.0, 2.0))
    assert stats.color_dim("0").axes[0].get_ylim() == pytest.approx((-10.0, 10.0))  # not beyond


def test_bad_requests_are_explained(recorded: ActivationStats) -> None:
    with pytest.raises(ValueError, match=r"statistics must be a non-empty subset of mean, std"):
        recorded.plot(["median"])
    model = zoo.mlp()
    with ActivationStats(model) as plain:
        model(torch.randn(2, 20))
    with pytest.raises(
        ValueError, match=r"no histograms for '0': record with ActivationStats\(..., with_hist=True\)"
    ):
        plain.color_dim(0)


def test_many_layers_are_colored_by_depth_and_the_movers_named(tmp_path: Path) -> None:
    # 20 layers: a legend would be unreadable; the layer whose statistics drift gets its name
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(20)])
    with ActivationStats(model) as stats:
        for _ in range(4):
            with torch.no_grad():
                model[13].weight.mul_(2.0)  # layer 13's output grows batch after batch
            model(torch.randn(32, 8))
    figure = stats.plot(["std"], path=tmp_path / "many.png")
    assert png_size(tmp_path / "many.png") == (650, 400)  # 5 in + 1.5 in for the colorbar
    panel, colorbar = figure.axes
    assert panel.get_legend() is None and colorbar.get_ylabel() == "layer, in execution order"
    assert [label.get_text() for label in colorbar.get_yticklabels()] == ["0", "9", "19"]
    named = [text.get_text() for text in panel.texts]
    assert named[0] == "13" and len(named) == 2  # the biggest mover first
    assert all(tick == int(tick) for tick in panel.get_xticks())  # whole batches


def test_one_batch_is_plotted_along_the_layers_with_the_bounds(tmp_path: Path) -> None:
    # the usual test records one batch: the useful axis is depth, not batches
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)])
    with ActivationStats(model) as stats:
        model(torch.randn(16, 8))
    figure = stats.plot(path=tmp_path / "one.png", std=(0.5, 2.0), max_near_zero=0.3)
    mean, std, near_zero = figure.axes
    assert std.get_xlabel() == "layer, in execution order"
    assert [label.get_text() for label in std.get_xticklabels()] == ["0", "1", "2", "3", "4", "5"]
    values, *bounds = std.lines
    assert list(values.get_ydata()) == pytest.approx([float(layer.std[0]) for layer in stats])
    assert [line.get_ydata()[0] for line in bounds] == [0.5, 2.0]
    assert [line.get_ydata()[0] for line in near_zero.lines[1:]] == [0.3] and len(mean.lines) == 1
    assert png_size(tmp_path / "one.png")[1] == 450


class _Troubled(torch.nn.Module):
    """Every gradient case the picture marks: healthy, unused, all zero, non-finite."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(4, 4)
        self.gated = torch.nn.Linear(4, 4)  # multiplied by 0: a gradient of zeros
        self.root = torch.nn.Linear(4, 4)  # through sqrt at 0: an infinite gradient
        self.spare = torch.nn.Linear(4, 4)  # never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zeroed = self.root(x) * 0.0
        return self.body(x) + 0.0 * self.gated(x) + torch.sqrt(zeroed.abs())


def test_the_gradient_flow_marks_every_kind_of_trouble(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Troubled()
    with GradientStats(model) as grads:
        model(torch.randn(3, 4)).sum().backward()
    figure = grads.plot(path=tmp_path / "grads.png", max_norm=10.0, min_norm=1e-3)
    assert png_size(tmp_path / "grads.png") == (600, 450)  # one step: one panel
    (axis,) = figure.axes
    assert axis.get_title() == "gradient norm per parameter (2 unused, 2 all zero, 2 non-finite)"
    assert axis.get_yscale() == "log"
    assert [label.get_text() for label in axis.get_xticklabels()] == [
        name for name, _ in model.named_parameters()
    ]
    _dots, medians, _largest, *marks_and_bounds = axis.lines
    expected = [float(grads[name].norm[0]) for name in ("body.weight", "body.bias")]
    assert list(medians.get_ydata()[:2]) == pytest.approx(expected)
    marks = {
        line.get_marker(): list(line.get_xdata()) for line in marks_and_bounds if line.get_marker() != "None"
    }
    assert marks == {"x": [6, 7], "o": [2, 3], "^": [4, 5]}  # spare, gated, root (by position)
    bounds = sorted(line.get_ydata()[0] for line in marks_and_bounds if line.get_linestyle() == "--")
    assert bounds == [1e-3, 10.0]


def test_several_steps_add_each_modules_norm_over_the_steps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"net": zoo.mlp(), "spare": torch.nn.Linear(2, 2)})  # spare: no line
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with GradientStats(model) as grads:
        for _ in range(3):
            optimizer.zero_grad()
            model["net"](torch.randn(8, 20)).pow(2).sum().backward()
            optimizer.step()
    figure = grads.plot(path=tmp_path / "steps.png")
    assert png_size(tmp_path / "steps.png") == (1200, 450)
    parameters, modules = figure.axes
    assert modules.get_title() == "gradient norm per module" and modules.get_yscale() == "log"
    norms = grads.module_norms()
    lines = {line.get_label(): list(line.get_ydata()) for line in modules.lines}
    assert lines.keys() == {name for name in norms if name != "spare"}
    for name, values in lines.items():
        assert values == pytest.approx(norms[name].tolist())
    assert all(tick == int(tick) for tick in modules.get_xticks())  # whole steps
    assert parameters.get_legend().get_texts()[0].get_text() == "norm (median over steps)"
