"""The model_sizes and model_summary fixtures: Hypothesis, devices."""

from __future__ import annotations

import pytest

from tests.plugin._helpers import MODELS, write


def test_fixtures_work_inside_given_tests(run, pytester) -> None:
    write(
        pytester,
        "test_given",
        """
        from hypothesis import HealthCheck, given, settings
        from pytest_modelhooks.strategies import image_batches, input_sizes
        import torch
        from torch import nn

        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())

        @settings(max_examples=5, deadline=None)
        @given(size=input_sizes(min_side=4, max_side=16))
        def test_sizes(model_sizes, model_summary, size):
            assert model_sizes(net, size[2:])[0] == (1, 4, *size[2:])
            assert model_summary(net, input_size=size).total_params == 112

        # function-scoped fixtures: suppress the health check; each example uses a fresh,
        # self-cleaning context manager
        @settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(batch=image_batches(min_side=4, max_side=8))
        def test_stats(activation_stats, batch):
            with activation_stats(net) as stats:
                net(batch)
            stats.check(std=(0.0, 10.0))
        """,
    )
    run().assert_outcomes(passed=2)


def test_cuda_device_is_skipped_without_cuda(pytester: pytest.Pytester, inprocess) -> None:
    pytester.makepyfile(models=MODELS)
    write(
        pytester,
        "test_device",
        """
        import pytest
        from models import mlp

        @pytest.mark.modelhooks(device="cuda")
        def test_on_cuda(hooked_model):
            hooked_model(mlp())
        """,
    )
    import torch

    result = inprocess("-p", "no:randomly")
    if torch.cuda.is_available():
        result.assert_outcomes(passed=1)
    else:
        result.assert_outcomes(skipped=1)


def test_data_given_in_the_size_slot_moves_to_the_fixture_device(pytestconfig, monkeypatch) -> None:
    # no second device here: record what goes through the fixtures' device mover instead
    import torch
    from torch import nn

    from pytest_modelhooks._plugin import fixtures as _fixtures

    moved: list[object] = []
    mover = _fixtures._inputs_to
    monkeypatch.setattr(
        _fixtures, "_inputs_to", lambda value, device: moved.append(value) or mover(value, device)
    )
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    batch, pair = torch.randn(2, 3, 8, 8), (torch.randn(2, 3, 8, 8),)
    sizes = _fixtures.bound("model_sizes", pytestconfig)(net, batch)
    summary = _fixtures.bound("model_summary", pytestconfig)(net, pair)
    assert list(sizes) == [(2, 4, 6, 6), (2, 4, 6, 6)] and summary.output_shapes == (2, 4, 6, 6)
    assert [id(value) for value in moved] == [id(batch), id(pair)]
    _fixtures.bound("model_sizes", pytestconfig)(net, (8, 8))  # a size is not data: not moved
    assert len(moved) == 2


def test_keyword_inputs_of_the_forward_move_to_the_fixture_device_and_options_do_not(
    pytestconfig, monkeypatch
) -> None:
    import torch
    from torch import nn

    from pytest_modelhooks._plugin import fixtures as _fixtures

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 6)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.proj(x)[mask]

    moved: list[object] = []
    mover = _fixtures._inputs_to
    monkeypatch.setattr(
        _fixtures, "_inputs_to", lambda value, device: moved.append(value) or mover(value, device)
    )
    batch, mask = torch.randn(2, 4), torch.tensor([True, False])
    summary = _fixtures.bound("model_summary", pytestconfig)(
        Masked(), input_data=batch, mask=mask, depth=1, engine="auto"
    )
    sizes = _fixtures.bound("model_sizes", pytestconfig)(Masked(), batch, mask=mask, modules="all")
    assert summary.output_shapes == (1, 6) and sizes[""] == (1, 6)
    assert sorted(map(id, moved)) == sorted(map(id, [batch, mask, batch, mask]))  # no option moved
    moved.clear()  # data given by the size slot's keyword moves too
    _fixtures.bound("model_summary", pytestconfig)(Masked(), input_size=batch, mask=mask)
    assert sorted(map(id, moved)) == sorted(map(id, [batch, mask]))
