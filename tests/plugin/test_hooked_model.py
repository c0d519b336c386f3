"""The hooked_model fixture."""

from __future__ import annotations

from tests.plugin._helpers import write


def test_hooked_model_removes_hooks_at_teardown_even_when_the_test_fails(run, pytester) -> None:
    write(
        pytester,
        "test_hooked",
        """
        import pytest
        from models import mlp
        from pytest_modelhooks import count_hooks

        @pytest.fixture
        def model():
            net = mlp()
            yield net
            assert count_hooks(net) == 0, "hooks left behind"  # runs after hooked_model's teardown

        def test_stores_outputs(model, hooked_model):
            hooks = hooked_model(model)
            model(__import__("torch").zeros(2, 8))
            assert [tuple(out.shape) for out in hooks.stored] == [(2, 16), (2, 16), (2, 4)]
            assert count_hooks(model) == 3

        def test_fails_midway(model, hooked_model):
            hooked_model(model, modules="leaves", grad=True)
            raise RuntimeError("the test body failed")
        """,
    )
    result = run()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*RuntimeError: the test body failed*"])
    assert "hooks left behind" not in result.stdout.str()


def test_stored_outputs_changed_in_place_warn_and_can_be_filtered_by_name(run, pytester) -> None:
    write(
        pytester,
        "test_inplace",
        """
        import torch
        from torch import nn

        def test_shapes_only(hooked_model):
            net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True))
            hooks = hooked_model(net, modules=["0"])
            net(torch.randn(2, 8))
            assert hooks["0"].stored.shape == (2, 16)  # the ReLU overwrote its values, not its shape

        def test_values_with_clone(hooked_model):
            net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True))
            hooks = hooked_model(net, modules=["0"], clone=True)
            net(torch.randn(2, 8))
            assert float(hooks["0"].stored.min()) < 0  # what the Linear returned
        """,
    )
    pytester.makeini("[pytest]\naddopts = -p no:randomly -p no:cacheprovider\nfilterwarnings = error\n")
    strict = run()
    strict.assert_outcomes(passed=1, failed=1)
    strict.stdout.fnmatch_lines(
        ["*StoredOutputChanged: Hook on Linear: a stored tensor was changed in place*"]
    )
    pytester.makeini(
        "[pytest]\naddopts = -p no:randomly -p no:cacheprovider\n"
        "filterwarnings =\n    error\n    ignore::pytest_modelhooks.StoredOutputChanged\n"
    )
    run().assert_outcomes(passed=2)
