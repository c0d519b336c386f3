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
        ["*gradient health check failed*", "*unused*Linear, 2 parameters*unused: 'unused' never ran*"]
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
            model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
            with gradient_stats(model, fused=False, modules="1") as grads:
                model(torch.randn(2, 3)).sum().backward()
            grads.check()
            assert grads.num_steps == 1
            assert [stats.name for stats in grads] == ["1.weight", "1.bias"]
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


def test_gradient_norm_bounds_come_from_the_marker_and_the_ini_file(run, pytester) -> None:
    pytester.makeini(
        "[pytest]\naddopts = -p no:randomly -p no:cacheprovider\nmodelhooks_max_grad_norm = 1e-6\n"
    )
    write(
        pytester,
        "test_bounds",
        """
        import pytest, torch
        from torch import nn

        def step(gradient_stats):
            torch.manual_seed(0)
            model = nn.Linear(3, 1)
            with gradient_stats(model) as grads:
                model(torch.randn(4, 3)).sum().backward()
            return grads

        def test_ini_bound_applies(gradient_stats):
            with pytest.raises(AssertionError, match=r"(?s)weight.*grad norm.*<= 1e-06.*exploding"):
                step(gradient_stats).check()

        def test_an_explicit_none_lifts_it(gradient_stats):
            step(gradient_stats).check(max_norm=None)

        @pytest.mark.modelhooks(max_grad_norm=1e6)
        def test_marker_wins(gradient_stats):
            step(gradient_stats).check()

        @pytest.mark.modelhooks(max_grad_norm=None, min_grad_norm=1e3)
        def test_vanishing_from_the_marker(gradient_stats):
            step(gradient_stats).check()
        """,
    )
    result = run()
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*test_vanishing_from_the_marker*", "*grad norm*>= 1000*vanishing*"])


def test_a_failing_gradient_check_writes_its_picture_when_plots_are_on(run, pytester, tmp_path) -> None:
    write(
        pytester,
        "test_flow",
        """
        import torch
        from torch import nn

        def step(gradient_stats):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
            with gradient_stats(model) as grads:
                model(torch.randn(4, 3)).sum().backward()
            return grads

        def test_exploding(gradient_stats):
            step(gradient_stats).check(max_norm=3.0)  # 2.bias: 4

        def test_healthy(gradient_stats):
            step(gradient_stats).check(max_norm=1e3)
        """,
    )
    plots = tmp_path / "plots"
    result = run(f"--modelhooks-plots={plots}")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*exploding*",
            "*Captured modelhooks call*",
            "gradient health check failed: * finding(s)*",
            "Gradients of every tracked parameter over 1 step (> marks a finding)",
            "*parameter*shape*norm*max_abs*nonfinite*updated",
            "   0.weight *4x3*",
            "   0.bias *",
            "   2.weight *1x4*",
            ">  2.bias *1 *4 *",
            "plot: *test_exploding-gradients.png",
        ]
    )
    assert [path.name.endswith("test_exploding-gradients.png") for path in plots.iterdir()] == [True]
