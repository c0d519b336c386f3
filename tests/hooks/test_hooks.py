from __future__ import annotations

import warnings
import weakref
from typing import Any

import pytest
import torch
from torch import nn

from pytest_modelhooks import (
    Hook,
    HookCallback,
    Hooks,
    StoredOutputChanged,
    count_hooks,
    hook_output,
    hook_outputs,
    hooks_by_module,
    select_modules,
)
from tests import zoo
from tests.helpers import untouched


def store_output(module: nn.Module, args: Any, output: Any) -> Any:
    return output


def test_hook_stores_what_the_function_returns_on_the_last_call() -> None:
    layer = nn.Linear(3, 2)
    with Hook(layer, lambda module, args, out: (module, args[0].shape, out.shape)) as hook:
        layer(torch.zeros(4, 3))
        layer(torch.zeros(5, 3))
        assert hook.stored == (layer, torch.Size([5, 3]), torch.Size([5, 2]))
    assert hook.removed
    assert count_hooks(layer) == 0
    assert hook.stored[2] == torch.Size([5, 2])  # still readable after removal


def test_hook_remove_is_idempotent_and_stops_the_hook() -> None:
    layer = nn.Linear(3, 2)
    calls: list[int] = []
    hook = Hook(layer, lambda *args: calls.append(1))
    assert not hook.removed and count_hooks(layer) == 1
    hook.remove()
    hook.remove()
    layer(torch.zeros(1, 3))
    assert calls == [] and hook.removed and count_hooks(layer) == 0


def test_a_removed_hook_lets_go_of_its_function_and_keeps_what_it_stored() -> None:
    """An object that hooks its own method is freed by reference counting once its hooks are
    removed (no cycle object -> hook -> bound method -> object for the collector)."""

    class Recorder:
        def __init__(self, layer: nn.Module) -> None:
            self.hook = Hook(layer, self.record)

        def record(self, module: nn.Module, args: Any, output: Any) -> Any:
            return output.sum()

    layer = nn.Linear(3, 2)
    recorder = Recorder(layer)
    layer(torch.ones(1, 3))
    hook, alive = recorder.hook, weakref.ref(recorder)
    hook.remove()
    del recorder
    assert alive() is None  # no gc.collect(): reference counting alone freed it
    assert hook.stored == layer(torch.ones(1, 3)).sum()
    with pytest.raises(RuntimeError, match="on Linear was removed"):
        hook.hook_fn(layer, (torch.ones(1, 3),), torch.ones(1, 2))


def test_hook_is_removed_when_the_block_raises() -> None:
    layer = nn.Linear(3, 2)
    with pytest.raises(RuntimeError, match="boom"), Hook(layer, store_output):
        raise RuntimeError("boom")
    assert count_hooks(layer) == 0


def test_detach_true_gives_tensors_without_graph_and_false_keeps_it() -> None:
    layer = nn.Linear(3, 2)
    with Hook(layer, store_output) as detached, Hook(layer, store_output, detach=False) as attached:
        layer(torch.zeros(1, 3))
    assert not detached.stored.requires_grad
    assert attached.stored.requires_grad and attached.stored.grad_fn is not None


@pytest.mark.parametrize("name", ["tuple_out", "dict_out", "dataclass_out", "gru"])
def test_detach_and_cpu_keep_nested_structure(name: str) -> None:
    model, batch = zoo.build(name)
    with untouched(model), Hook(model, store_output, cpu=True) as hook:
        expected = model(batch)
    stored = hook.stored
    assert type(stored) is type(expected)
    if isinstance(expected, zoo.Pair):
        assert stored._fields == expected._fields
        leaves = [stored.low, stored.high]
    elif isinstance(expected, dict):
        assert list(stored) == list(expected)
        leaves = list(stored.values())
    elif isinstance(expected, zoo.Output):
        assert isinstance(stored.hidden, tuple)
        leaves = [stored.logits, *stored.hidden]
    else:
        leaves = [stored]
    for leaf in leaves:
        assert isinstance(leaf, torch.Tensor) and not leaf.requires_grad and leaf.device.type == "cpu"


def test_hook_inputs_are_detached_too() -> None:
    layer = nn.Linear(3, 2)
    source = torch.zeros(1, 3, requires_grad=True)
    with Hook(layer, lambda module, args, out: args) as hook:
        layer(source * 2)
    assert isinstance(hook.stored, tuple) and not hook.stored[0].requires_grad


def test_backward_hook_stores_gradients() -> None:
    layer = nn.Linear(3, 2)
    with Hook(layer, lambda module, grad_in, grad_out: grad_out, is_forward=False) as hook:
        layer(torch.ones(4, 3, requires_grad=True)).sum().backward()
    assert torch.equal(hook.stored[0], torch.ones(4, 2))
    assert count_hooks(layer) == 0


def test_hook_output_grad_stores_the_output_gradient() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    with hook_output(net[0], grad=True) as hook:
        net(torch.ones(2, 3)).sum().backward()
    expected = net[1].weight.detach().expand(2, 4)
    torch.testing.assert_close(hook.stored, expected)
    assert count_hooks(net) == 0


def test_an_output_gradient_that_cannot_come_is_said_once_at_the_callers_line() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    with hook_output(net[0], grad=True) as hook:
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            net(torch.ones(2, 3))
            net(torch.ones(2, 3))  # once per hook, not per call
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            net(torch.ones(2, 3)).sum().backward()  # a forward with grad: no warning, a gradient
    (warning,) = [w for w in caught if "hook_output(grad=True)" in str(w.message)]
    assert "on Linear: its output does not require grad (a forward under torch.no_grad()" in str(
        warning.message
    )
    assert warning.filename == __file__  # the user's forward call, not torch's module code
    assert hook.stored is not None and hook.stored.shape == (2, 4)


def test_output_gradients_survive_in_place_ops_downstream() -> None:
    # A full backward hook on conv1 would raise here (its output is modified in place by bn1's
    # in-place ReLU and by `out += identity`); tensor hooks do not.
    model, batch = zoo.build("resnetish")
    leaves = [module for name, module in model.named_modules() if name and not list(module.children())]
    with untouched(model, values=False), hook_outputs(leaves, grad=True) as hooks:
        model(batch).sum().backward()
    stored = dict(zip([type(hook.module).__name__ for hook in hooks], hooks.stored, strict=True))
    assert stored["Linear"].shape == (2, 10)
    conv = hooks[0].stored
    assert conv.shape == (2, 16, 32, 32) and not conv.requires_grad


def test_output_gradient_of_a_tuple_output_is_a_tuple() -> None:
    model, batch = zoo.build("tuple_out")
    with hook_output(model, grad=True) as hook:
        out = model(batch)
        (out.low.sum() * 2 + out.high.sum()).backward()
    assert isinstance(hook.stored, tuple)
    assert torch.equal(hook.stored[0], torch.full((2, 3), 2.0))
    assert torch.equal(hook.stored[1], torch.ones(2, 2))


def test_hooks_is_a_sequence_removed_together() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with hook_outputs(net) as hooks:
        net(torch.randn(5, 3))
        assert len(hooks) == 3
        assert isinstance(hooks[0], Hook) and hooks[-1].module is net[2]
        assert [hook.module for hook in hooks] == list(net)
        assert [out.shape for out in hooks.stored] == [(5, 4), (5, 4), (5, 2)]
        assert count_hooks(net) == 3
    assert hooks.removed and count_hooks(net) == 0


def test_hooks_registered_before_a_failure_are_removed() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with pytest.raises(TypeError, match=r"must be an nn\.Module"):
        Hooks([net[0], "not a module", net[1]], store_output)  # type: ignore[list-item]
    assert count_hooks(net) == 0


def test_hooks_rejects_a_single_non_container_module() -> None:
    with pytest.raises(TypeError, match=r"single Linear; use Hook\(\) or pass \[module\]"):
        Hooks(nn.Linear(2, 2), store_output)
    with pytest.raises(TypeError, match=r"single Linear"):
        hook_outputs(nn.Linear(2, 2))


def test_reused_module_stores_its_last_call() -> None:
    model, batch = zoo.build("reused")
    with hook_output(model.shared) as hook:
        calls: list[torch.Size] = []
        with Hook(model.shared, lambda module, args, out: calls.append(out.shape)):
            model(batch)
    assert len(calls) == 2
    expected = model.shared(torch.relu(model.shared(model.inp(batch))))
    torch.testing.assert_close(hook.stored, expected.detach())


def test_hooks_by_module_and_count_hooks_see_foreign_hooks() -> None:
    model, _ = zoo.build("resnetish")
    handle = model.layer1[0].conv1.register_forward_pre_hook(lambda *args: None)
    handle2 = model.register_full_backward_hook(lambda *args: None)
    assert hooks_by_module(model) == {"layer1.0.conv1": 1, "": 1}
    assert count_hooks(model) == 2
    handle.remove()
    handle2.remove()
    assert count_hooks(model) == 0 and hooks_by_module(model) == {}


class Recorder(HookCallback):
    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.seen: list[str] = []
        self.batches = 0

    def hook(self, module: nn.Module, input: Any, output: Any) -> None:
        self.seen.append(type(module).__name__)

    def on_batch_end(self, train: bool = True, **kwargs: Any) -> None:
        self.batches += 1


def test_hook_callback_defaults_to_modules_that_own_parameters() -> None:
    model, batch = zoo.build("with_parameter")
    callback = Recorder(model)
    assert callback.module_names == ["", "body.0"]  # the loose Parameter makes the root count
    callback.on_train_begin()
    callback.on_train_begin()  # a second call does not double-register
    assert count_hooks(model) == 2
    model(batch)
    callback.on_batch_end()
    callback.on_train_end()
    assert callback.seen == ["Linear", "WithParameter"] and callback.batches == 1
    assert count_hooks(model) == 0


def test_hook_callback_keeps_hooks_without_do_remove() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    callback = Recorder(model, do_remove=False)
    callback.on_train_begin()
    callback.on_train_end()
    assert count_hooks(model) == 1
    callback.remove()
    assert count_hooks(model) == 0


def test_hook_callback_context_removes_hooks_when_the_loop_raises() -> None:
    model, batch = zoo.build("resnetish")
    with (
        untouched(model, values=False),
        pytest.raises(ValueError, match="loss exploded"),
        Recorder(model, modules="leaves"),
    ):
        model(batch)
        raise ValueError("loss exploded")


def test_hook_callback_base_needs_a_hook_method() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(NotImplementedError, match="must define hook"), HookCallback(model):
        model(torch.zeros(1, 2))
    assert count_hooks(model) == 0


def test_hook_callback_works_from_a_plain_training_loop() -> None:
    model, batch = zoo.build("mlp")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    callback = Recorder(model, modules=nn.Linear)
    callback.on_train_begin()
    for _ in range(3):
        loss = model(batch).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        callback.on_batch_end()
    callback.on_train_end()
    assert callback.seen == ["Linear"] * 9 and callback.batches == 3
    assert count_hooks(model) == 0


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, ["stem.0", "stem.1", "layer1.0.conv1"]),
        ("children", ["stem", "layer1", "layer2", "pool", "fc"]),
        ("layer2.*.conv?", ["layer2.0.conv1", "layer2.0.conv2", "layer2.1.conv1", "layer2.1.conv2"]),
        ("fc", ["fc"]),
        (nn.AdaptiveAvgPool2d, ["pool"]),
        (["fc", "stem"], ["fc", "stem"]),
        (["fc", nn.Linear], ["fc"]),
    ],
)
def test_select_modules(spec: Any, expected: list[str]) -> None:
    model = zoo.ResNetish()
    names = [name for name, _ in select_modules(model, spec)]
    assert names[: len(expected)] == expected if spec is None else names == expected


def test_select_modules_keywords() -> None:
    model = zoo.ResNetish()
    leaves = [name for name, _ in select_modules(model, "leaves")]
    assert "layer1.0.conv1" in leaves and "layer1" not in leaves and "" not in leaves
    everything = [name for name, _ in select_modules(model, "all")]
    assert everything[0] == "" and len(everything) == len(list(model.modules()))
    assert select_modules(model, model.fc) == [("fc", model.fc)]


def test_keywords_leave_out_parametrization_modules() -> None:
    # weight_norm / spectral_norm compute the weight in submodules that run when it is read:
    # selected by "params" (they own the original tensors), their weight became an
    # "activation" series, dead units and growth included
    from torch.nn.utils import parametrizations

    from pytest_modelhooks import ActivationStats

    model = nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 4))
    parametrizations.weight_norm(model[0])
    parametrizations.spectral_norm(model[2])
    assert [name for name, _ in select_modules(model, "params")] == ["0", "2"]  # "0" owns no bias
    assert [name for name, _ in select_modules(model, "leaves")] == ["0", "1", "2"]
    assert [name for name, _ in select_modules(model, "all")] == ["", "0", "1", "2"]
    named = select_modules(model, "0.parametrizations.weight")  # asked for by name: given
    assert [type(module).__name__ for _, module in named] == ["ParametrizationList"]
    with ActivationStats(model) as stats:
        model(torch.randn(32, 8))
    assert stats.series_names == ["0", "2"]


def test_select_modules_lists_a_reused_module_once() -> None:
    model = nn.Sequential()
    shared = nn.Linear(2, 2)
    model.add_module("a", shared)
    model.add_module("b", shared)
    assert [name for name, _ in select_modules(model, "leaves")] == ["a"]


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        (
            "decoder.*",
            ValueError,
            r"modules='decoder\.\*' matches no module of ResNetish; its modules are: stem,",
        ),
        ("nope", ValueError, r"modules='nope' matches no module"),
        (nn.LSTM, ValueError, r"modules=LSTM matches no module of ResNetish"),
        (nn.Linear(2, 2), ValueError, r"the Linear passed is not a submodule of ResNetish"),
        (3, TypeError, r"expected a name, glob, module type, module or one of children"),
        (int, TypeError, r"int is not an nn.Module type"),
    ],
)
def test_select_modules_errors_name_the_argument(spec: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        select_modules(zoo.ResNetish(), spec)


def test_hook_callbacks_warn_about_compiled_models() -> None:
    with pytest.warns(
        UserWarning, match=r"torch.compile'd model: hooks registered after its first call never fire"
    ):
        Recorder(torch.compile(nn.Sequential(nn.Linear(2, 2))))


def test_hooks_can_be_looked_up_by_name() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with Hooks(list(net), store_output, names=["proj", "act"]) as hooks:
        net(torch.ones(2, 3))
    assert hooks["act"] is hooks[1]
    assert set(hooks.stored_by_name) == {"proj", "act"}
    with pytest.raises(KeyError, match=r"no hook for 'nope'; hooked modules: proj, act"):
        hooks["nope"]
    with pytest.raises(ValueError, match=r"names: got 1 names for 2 modules"):
        Hooks(list(net), store_output, names=["proj"])
    assert count_hooks(net) == 0
    unnamed = hook_outputs(net)
    with pytest.raises(ValueError, match="created without names"):
        _ = unnamed.stored_by_name
    unnamed.remove()


def test_scripted_submodules_are_left_out_of_keyword_selections_and_refused_by_name() -> None:
    # TorchScript modules take no Python hooks: "params" (the default) skips them, naming one
    # says why, and a failed registration leaves no hook behind
    from pytest_modelhooks import ActivationStats

    model = nn.Sequential(nn.Linear(3, 4), torch.jit.script(nn.Linear(4, 4)), nn.ReLU())
    with untouched(model), ActivationStats(model) as stats:
        model(torch.randn(2, 3))
    assert stats.series_names == ["0"]
    with untouched(model), pytest.raises(TypeError, match=r"modules: '1' is a TorchScript module"):
        ActivationStats(model, modules=["0", "1"])


class _WithLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_a_hook_on_a_scripted_module_is_refused_saying_what_to_hook() -> None:
    scripted = torch.jit.script(_WithLinear())
    makers = (
        lambda module: Hook(module, lambda *args: None),
        hook_output,
        lambda module: hook_outputs([module]),
        lambda module: hook_output(module, grad=True),
    )
    for module in (scripted, scripted.linear):
        for make in makers:
            with untouched(scripted), pytest.raises(TypeError, match=r"TorchScript module.*eager module"):
                make(module)


@pytest.mark.parametrize("in_dims", [0, 1])
def test_outputs_stored_under_vmap_are_the_whole_batch_batch_first(in_dims: int) -> None:
    # the wrapper a hook sees inside vmap escapes unreadable ("your tensor may have escaped")
    from torch.func import vmap

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    batch = torch.randn(5, 4)
    with hook_outputs([model[0], model[2]]) as hooks:
        vmap(model, in_dims=in_dims)(batch.movedim(0, in_dims))
    first, last = hooks.stored
    torch.testing.assert_close(first, model[0](batch).detach())
    assert last.shape == (5, 2)


def test_unvmapped_orders_nested_vmap_levels_outermost_first() -> None:
    from torch.func import vmap

    from pytest_modelhooks.hooks import unvmapped

    seen: list[tuple[torch.Tensor, int]] = []

    def inner(x: torch.Tensor) -> torch.Tensor:
        seen.append(unvmapped(x * 1))
        return x.sum()

    data = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)  # (outer, feature, inner)
    vmap(vmap(inner, in_dims=1), in_dims=0)(data)
    plain, levels = seen[0]
    assert levels == 2 and not torch._C._functorch.is_functorch_wrapped_tensor(plain)
    torch.testing.assert_close(plain, data.movedim(2, 1))  # (outer, inner, feature)


def _inplace_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True)).eval()


def test_a_stored_output_changed_in_place_later_warns_when_read() -> None:
    # the BatchNorm's output is the ReLU's input, which ReLU(inplace=True) overwrites
    net = _inplace_net()
    batch = torch.randn(2, 3, 8, 8)
    with hook_outputs([net[0], net[1]]) as hooks:
        net(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conv_out = hooks[0].stored  # nothing changed it: no warning
    with pytest.warns(
        StoredOutputChanged, match=r"Hook on BatchNorm2d: a stored tensor was changed in place"
    ) as seen:
        bn_out = hooks[1].stored
    assert seen[0].filename == __file__  # points at the reader, not at the library
    assert float(bn_out.min()) == 0.0  # what the ReLU left, not what the BatchNorm returned
    assert float(conv_out.min()) < 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hooks.stored  # noqa: B018 - once per stored value


def test_clone_keeps_what_the_module_returned() -> None:
    net = _inplace_net()
    batch = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = net[1](net[0](batch)).clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with hook_outputs([net[1]], clone=True) as hooks, hook_output(net[1], cpu=True, clone=True) as on_cpu:
            net(batch)
        torch.testing.assert_close(hooks.stored[0], expected)
        torch.testing.assert_close(on_cpu.stored, expected)
    assert float(expected.min()) < 0.0


def test_nested_outputs_are_stored_detached_copied_and_on_the_cpu() -> None:
    parts = [torch.randn(2, 4), torch.randn(5, 4)]
    batch = torch.nested.nested_tensor(parts, layout=torch.jagged, requires_grad=True)
    layer = nn.Linear(4, 3)
    with hook_output(layer, cpu=True) as plain, hook_output(layer, clone=True) as copied:
        out = layer(batch)
    for hook in (plain, copied):
        stored = hook.stored
        assert stored.is_nested and not stored.requires_grad
        assert [tuple(part.shape) for part in stored.unbind()] == [(2, 3), (5, 3)]
        torch.testing.assert_close(stored.values(), out.values().detach())
    assert copied.stored.values().data_ptr() != out.values().data_ptr()
    assert count_hooks(layer) == 0


def test_globs_read_as_path_globs_star_within_a_part_double_star_across() -> None:
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Sequential(nn.Linear(2, 2), nn.ReLU()) for _ in range(2)])
    model.head = nn.Linear(2, 2)

    def names(spec: str) -> list[str]:
        return [name for name, _ in select_modules(model, spec)]

    assert names("blocks.*") == ["blocks.0", "blocks.1"]  # not blocks.0.0: * stops at a dot
    assert names("blocks.**") == [
        "blocks.0",
        "blocks.0.0",
        "blocks.0.1",
        "blocks.1",
        "blocks.1.0",
        "blocks.1.1",
    ]
    assert names("blocks.*.0") == ["blocks.0.0", "blocks.1.0"]
    assert names("**.1") == ["blocks.0.1", "blocks.1", "blocks.1.1"]
    assert names("blocks.[!0]") == ["blocks.1"] and names("h?ad") == ["head"]
    assert names("*.0") == ["blocks.0"] and names("bl*") == ["blocks"]  # one part each
    with pytest.raises(ValueError, match=r"modules='head\.\*' matches no module"):
        names("head.*")
