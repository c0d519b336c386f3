"""--modelhooks-check-leaks."""

from __future__ import annotations

from tests.plugin._helpers import write


def test_hook_guard_names_the_module_with_a_hook_added_during_the_test(run, pytester) -> None:
    write(
        pytester,
        "test_leaks",
        """
        from models import mlp

        def test_leaves_a_hook(model_sizes):
            model = mlp()
            model_sizes(model, input=__import__("torch").zeros(1, 8))
            model[2].register_forward_hook(lambda *args: None)  # never removed

        def test_clean(model_summary):
            model_summary(mlp(), input_size=(1, 8))
        """,
    )
    guarded = run("--modelhooks-check-leaks")
    guarded.assert_outcomes(passed=2, errors=1)
    guarded.stdout.fnmatch_lines(
        [
            "*modelhooks: hooks added during the test are still registered:*",
            "*Sequential '2' (Linear): 1 forward hook*",
        ]
    )
    run().assert_outcomes(passed=2)
