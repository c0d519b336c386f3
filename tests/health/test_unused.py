"""Parameters without a gradient: grouped by module, each group told what its module did."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pytest_modelhooks import GradientStats, count_hooks
from tests.helpers import untouched


class Branches(nn.Module):
    """A trunk and four ways for a branch to give its parameters no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 4)
        self.spare = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))  # never called
        self.frozen_path = nn.Linear(4, 4)  # called under no_grad
        self.discarded = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))  # output thrown away
        self.embed = nn.Linear(4, 4)
        self.mask_token = nn.Parameter(torch.zeros(4))  # beside used ones, itself unused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.frozen_path(x)
        self.discarded(x).detach()
        return self.trunk(x) + self.embed(x)


def _rows(model: nn.Module, step) -> dict[str, tuple[str, str]]:  # type: ignore[no-untyped-def]
    with GradientStats(model) as grads:
        step(model)
    return {finding.layer: (finding.layer_type, finding.note) for finding in grads.findings()}


def test_each_way_to_get_no_gradient_is_one_row_saying_what_happened() -> None:
    rows = _rows(Branches(), lambda model: model(torch.randn(3, 4)).sum().backward())
    assert list(rows) == ["mask_token", "spare", "frozen_path", "discarded"]  # the model's order
    assert rows["spare"] == (
        "Sequential, 4 parameters",
        "unused: 'spare' never ran while recording (a branch not taken, or a layer never called)",
    )
    assert rows["frozen_path"][0] == "Linear, 2 parameters"
    assert "'frozen_path' ran only with gradients off" in rows["frozen_path"][1]
    assert rows["discarded"][0] == "Sequential, 4 parameters"
    assert "'discarded' ran, but none of its output reached the loss" in rows["discarded"][1]
    # the model's other parameters got theirs: this one is named alone, its shape as its kind
    assert rows["mask_token"][0] == "parameter 4"
    assert (
        "the other parameters of the model (Branches) got gradients, this one none" in rows["mask_token"][1]
    )


def test_a_group_stops_where_a_gradient_arrived() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)}))
    rows = _rows(model, lambda model: model[1]["a"](model[0](torch.randn(2, 4))).sum().backward())
    assert list(rows) == ["1.b"] and rows["1.b"][0] == "Linear, 2 parameters"


def test_a_loss_that_does_not_depend_on_the_model_is_told_apart_from_no_backward() -> None:
    scale = torch.ones(2, requires_grad=True)

    def detached(model: nn.Module) -> None:
        (model(torch.randn(3, 4)).detach() * scale).sum().backward()

    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    ((layer, note),) = _rows(model, detached).values()
    assert layer == "Sequential"
    assert note.startswith(
        "no backward pass reached the model (4 parameter(s) require grad), though it ran with gradients on"
    )
    # a model that never ran is still told to call backward
    ((layer, note),) = _rows(model, lambda model: None).values()
    assert note.startswith(
        "no backward pass was recorded (4 parameter(s) require grad); call loss.backward()"
    )


def test_a_parameter_used_by_code_outside_its_module_counts_as_used() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)  # its weight used directly, the module never called

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(x, self.proj.weight)

    rows = _rows(Tied(), lambda model: model(torch.randn(2, 4)).sum().backward())
    assert list(rows) == ["proj.bias"]
    assert "the other parameters of 'proj' got gradients, this one none" in rows["proj.bias"][1]


def test_excluded_modules_are_left_out_of_the_groups() -> None:
    model = Branches()
    with GradientStats(model) as grads:
        model(torch.randn(3, 4)).sum().backward()
    rows = {
        finding.layer: finding.layer_type for finding in grads.findings(exclude=["spare.0", "frozen_path"])
    }
    assert rows == {  # what 'spare' has left to judge: the parameters of 'spare.2'
        "mask_token": "parameter 4",
        "spare": "Sequential, 2 parameters",
        "discarded": "Sequential, 4 parameters",
    }


def test_the_watch_hooks_go_at_the_first_call_with_gradients_and_all_go_at_the_end() -> None:
    model = Branches()
    with untouched(model, values=False):
        with GradientStats(model) as grads:
            at_start = count_hooks(model)
            model(torch.randn(3, 4)).sum().backward()
            # the model's step hook, and the watches of what has not run with gradients on:
            # the never-called branch (two modules with parameters) and the no_grad one
            assert count_hooks(model) == 1 + 2 + 1 < at_start
        assert grads.calls.ran("trunk") is True and grads.calls.ran("frozen_path") is False
        assert grads.calls.ran("spare") is None and grads.calls.ran("") is True
    assert count_hooks(model) == 0


def test_ran_names_what_it_cannot_answer() -> None:
    model = Branches()
    with GradientStats(model) as grads:
        model(torch.randn(3, 4)).sum().backward()
    with pytest.raises(ValueError, match=r"'spare.1' holds no tracked parameter"):
        grads.calls.ran("spare.1")  # the ReLU
    with pytest.raises(AttributeError, match="nothing"):
        grads.calls.ran("nothing")


def test_a_compiled_model_says_only_that_no_gradient_came() -> None:
    model = nn.ModuleDict({"used": nn.Linear(4, 2), "spare": nn.Linear(4, 2)})
    model["used"].compile(backend="eager")
    with GradientStats(model) as grads:
        model["used"](torch.randn(3, 4)).sum().backward()
    assert not grads.calls.seen()
    (finding,) = grads.findings()
    assert (finding.layer, finding.note) == ("spare", "unused: none of its parameters got a gradient")


def test_torchscript_says_only_that_no_gradient_came() -> None:
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.spare = nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    model = torch.jit.script(Skip())
    with GradientStats(model) as grads:
        model(torch.randn(3, 4)).sum().backward()
    (finding,) = grads.findings()
    assert (finding.layer, finding.note) == ("spare", "unused: none of its parameters got a gradient")
    with pytest.raises(ValueError, match="TorchScript"):
        grads.calls.ran("spare")


def test_a_module_reused_with_and_without_gradients_counts_as_run_with_them() -> None:
    shared = nn.Linear(4, 4)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second, self.spare = shared, shared, nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                x = self.first(x)
            return self.second(x)

    model = Twice()
    with GradientStats(model) as grads:
        model(torch.randn(2, 4)).sum().backward()
    assert grads.calls.ran("first") is True  # one module under two names: its first name
    assert [finding.layer for finding in grads.findings()] == ["spare"]


def test_a_forward_that_raises_leaves_no_hook_and_what_ran_before_is_known() -> None:
    class Fails(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.before, self.after = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.before(x)
            raise RuntimeError("mid-forward")

    model = Fails()
    with pytest.raises(RuntimeError, match="mid-forward"), GradientStats(model) as grads:
        model(torch.randn(2, 4))
    assert count_hooks(model) == 0
    assert grads.calls.ran("before") is True and grads.calls.ran("after") is None


def test_recording_again_watches_only_what_has_not_run_with_gradients() -> None:
    model = Branches()
    grads = GradientStats(model)
    grads.start()
    model(torch.randn(3, 4)).sum().backward()
    grads.stop()
    assert count_hooks(model) == 0
    grads.start()  # the step hook, and the watches of 'spare' (2 modules) and 'frozen_path'
    assert count_hooks(model) == 1 + 2 + 1
    grads.stop()
    assert grads.calls.ran("spare") is None and grads.calls.ran("trunk") is True
