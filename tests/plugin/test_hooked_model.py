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
