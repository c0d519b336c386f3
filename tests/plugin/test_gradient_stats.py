"""The gradient_stats fixture."""

from __future__ import annotations

from tests.plugin._helpers import write


def test_gradient_stats_names_unused_parameters(run, pytester) -> None:
    write(
        pytester,
        "test_grads",
        """
        import torch
        from torch import nn

        def test_unused(gradient_stats):
            model = nn.ModuleDict({"used": nn.Linear(3, 1), "unused": nn.Linear(3, 1)})
            with gradient_stats(model) as grads:
                model["used"](torch.randn(2, 3)).sum().backward()
            grads.check()
        """,
    )
    result = run()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*gradient health check failed*", "*unused.weight*unused: its .grad stayed None*"]
    )


def test_gradient_stats_takes_the_library_options(run, pytester) -> None:
    # the fixture forwards GradientStats' keyword options (fused=... raised TypeError once)
    write(
        pytester,
        "test_options",
        """
        import torch
        from torch import nn

        def test_options(gradient_stats):
            model = nn.Linear(3, 1)
            with gradient_stats(model, fused=False) as grads:
                model(torch.randn(2, 3)).sum().backward()
            grads.check()
            assert grads.num_steps == 1
        """,
    )
    run().assert_outcomes(passed=1)


def test_gradient_stats_names_parameters_the_optimizer_left_out(run, pytester) -> None:
    write(
        pytester,
        "test_optimizer",
        """
        import torch
        from torch import nn

        def test_forgotten_head(gradient_stats):
            model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
            optimizer = torch.optim.AdamW(model[0].parameters())
            with gradient_stats(model) as grads:
                for _ in range(2):
                    optimizer.zero_grad()
                    model(torch.randn(2, 3)).sum().backward()
                    optimizer.step()
            grads.check(require_update=False)  # the option reaches the check
            grads.check()
        """,
    )
    result = run()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*gradient health check failed: 2 finding(s)*",
            "*2.weight*update*in none of the param groups of AdamW, the optimizer that stepped*",
        ]
    )
