"""model_sizes and num_features_model, checked against the sizes plain torch hooks see in a real forward."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pytest_modelhooks import (
    LayerError,
    dummy_batch,
    model_sizes,
    num_features_model,
)
from tests import zoo
from tests.helpers import observed_sizes, untouched


@pytest.mark.parametrize("name", list(zoo.ZOO))
@pytest.mark.parametrize("modules", ["children", "leaves", "all"])
def test_model_sizes_match_a_plain_forward(name: str, modules: str) -> None:
    model, batch = zoo.build(name)
    reference = observed_sizes(model, batch, modules)
    with untouched(model):
        sizes = model_sizes(model, input=batch, modules=modules)
    if modules == "leaves":
        # a module that ran while nothing inside it did (attention using its out_proj's weights
        # itself) is a leaf of the forward: listed, in the model's order
        everything = observed_sizes(model, batch, "all")
        working = [name for name in sizes.names if name not in reference]
        for name in working:
            assert everything[name] and not any(
                everything[inner] for inner in everything if inner.startswith(name + ".")
            )
        reference = {name: everything[name] for name in sizes.names}
        assert [name for name in everything if name in reference] == list(sizes.names)
    if modules == "all":  # the model's own row last: sizes[-1] is the model's output
        reference = {**{name: calls for name, calls in reference.items() if name}, "": reference[""]}
    assert list(sizes.names) == list(reference)
    for layer, calls in reference.items():
        assert sizes.calls(layer) == calls, layer
        assert sizes[layer] == (calls[-1] if calls else None)
    assert sizes.engine == ("real" if name == "data_dependent" else "meta")


def test_model_sizes_fastai_style_positional_access() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.Flatten()
    )
    sizes = model_sizes(net, (64, 64))
    assert len(sizes) == 4
    assert sizes[0] == (1, 16, 32, 32) and sizes[-1] == (1, 32 * 16 * 16)
    assert sizes[1:3] == [(1, 16, 32, 32), (1, 32, 16, 16)]
    assert sizes == [(1, 16, 32, 32), (1, 16, 32, 32), (1, 32, 16, 16), (1, 8192)]
    assert [tuple(size) for size in sizes] == [tuple(size) for size in sizes.calls("0") + sizes[1:]]


def test_model_sizes_by_qualified_name_on_a_non_sequential_model() -> None:
    sizes = model_sizes(zoo.ResNetish(), (32, 32), modules=["layer2", "layer2.0.downsample", "fc"])
    assert sizes["layer2"] == (1, 32, 16, 16)
    assert sizes["layer2.0.downsample"] == (1, 32, 16, 16)
    assert sizes["fc"] == (1, 10)
    assert sizes["layer1.1"] == (1, 16, 32, 32)  # not selected, but it ran: any module's name indexes
    with pytest.raises(
        KeyError, match="'layer3' is not a module of the model; the measured layers are: layer2"
    ):
        sizes["layer3"]


def test_model_sizes_reports_modules_that_never_ran_and_every_call() -> None:
    model = zoo.Reused()
    model.extra = nn.Linear(2, 2)  # registered, never called
    sizes = model_sizes(model, input=torch.zeros(3, 6))
    assert sizes.never_ran == ["extra"] and sizes["extra"] is None and not sizes.ran("extra")
    assert sizes.calls("shared") == [(3, 8), (3, 8)]
    lines = [" ".join(line.split()) for line in str(sizes).splitlines()]
    assert "extra (Linear) never ran" in lines
    assert "shared (Linear) (3, 8) | (3, 8)" in lines


def test_model_sizes_nested_outputs_keep_their_structure() -> None:
    sizes = model_sizes(zoo.GRUNet(), (7,))
    out, hidden = sizes["gru"]
    assert out == (1, 7, 20) and hidden == (2, 1, 20)
    dict_sizes = model_sizes(zoo.DictOut(), input=torch.zeros(2, 4), modules="all")
    assert dict_sizes[""] == {"logits": (2, 2), "hidden": (2, 6)}
    assert json.loads(json.dumps(dict_sizes.to_dict()))[""]["calls"] == [{"logits": [2, 2], "hidden": [2, 6]}]


def test_model_sizes_takes_several_inputs_and_keyword_inputs() -> None:
    model = zoo.TwoInputs()
    image, extra = torch.zeros(2, 3, 8, 8), torch.zeros(2, 5)
    positional = model_sizes(model, input=(image, extra))
    keywords = model_sizes(model, input={"image": image, "extra": extra})
    assert positional == keywords
    assert positional["image"] == (2, 4, 6, 6) and positional["fuse"] == (2, 2)


def test_model_sizes_does_not_compute_on_the_weights() -> None:
    model = zoo.ResNetish()
    devices: list[str] = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if func is torch.nn.functional.conv2d:
                devices.append(args[1].device.type)  # the weight
            return func(*args, **(kwargs or {}))

    with Spy():
        sizes = model_sizes(model, (32, 32))
    assert sizes.engine == "meta"
    assert devices and set(devices) == {"meta"}
    devices.clear()
    with Spy():
        model_sizes(model, (32, 32), engine="real")
    assert set(devices) == {"cpu"}  # the spy does see real compute


def test_model_sizes_engines_agree_and_can_be_forced() -> None:
    model = zoo.UNet()
    results = {engine: model_sizes(model, (16, 16), engine=engine) for engine in ("meta", "fake", "real")}
    assert results["meta"] == results["fake"] == results["real"]
    assert {engine: result.engine for engine, result in results.items()} == {
        "meta": "meta",
        "fake": "fake",
        "real": "real",
    }


def test_data_dependent_control_flow_falls_back_to_a_real_forward() -> None:
    model = zoo.DataDependent()
    with untouched(model):
        sizes = model_sizes(model, input=torch.zeros(2, 4))
    assert sizes.engine == "real" and sizes["pos"] == (2, 3) and sizes.never_ran == ["neg"]
    with untouched(model), pytest.raises(LayerError, match=r"model DataDependent got input \(2, 4\).*meta"):
        model_sizes(model, input=torch.zeros(2, 4), engine="meta")


def test_a_model_built_on_meta_is_sized_without_memory() -> None:
    with torch.device("meta"):
        model = zoo.ResNetish(width=64)
    sizes = model_sizes(model, (224, 224))
    assert sizes.engine == "meta" and sizes["fc"] == (1, 10) and sizes["layer2"] == (1, 128, 112, 112)
    with pytest.raises(
        ValueError, match="engine='real' cannot run ResNetish: its weights are on the meta device"
    ):
        model_sizes(model, (224, 224), engine="real")


class Broken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(64, 8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class BrokenInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=0)


@pytest.mark.parametrize("engine", ["auto", "meta", "fake", "real"])
def test_a_failing_layer_is_named_with_the_shapes_it_got(engine: str) -> None:
    model = Broken().train()
    with untouched(model), pytest.raises(LayerError) as info:
        model_sizes(model, (34, 34), engine=engine)
    message = str(info.value)
    assert message.startswith(
        "layer 'features.3' (Conv2d, in_channels=64) got input (1, 32, 16, 16): RuntimeError"
    )
    assert info.value.layer == "features.3" and info.value.layer_type == "Conv2d"
    assert info.value.input_shapes == ((1, 32, 16, 16),)
    assert isinstance(info.value.original, RuntimeError)
    assert info.value.__suppress_context__  # the torch-internal traceback is not chained


def test_a_failure_in_the_models_own_forward_names_the_last_layer_that_ran() -> None:
    model = BrokenInForward()
    with (
        untouched(model),
        pytest.raises(
            LayerError, match=r"model BrokenInForward got input \(2, 4\): .*after layer 'b' returned \(2, 5\)"
        ),
    ):
        model_sizes(model, input=torch.zeros(2, 4))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "resnet"}, TypeError, r"model must be an nn.Module, got str 'resnet'"),
        ({"model": nn.Linear}, TypeError, r"got the class Linear: pass an instance, Linear\(...\)"),
        (
            {"size": (64,)},
            ValueError,
            r"size=\(64,\) has 1 dimension\(s\) but the first layer 'stem.0' \(Conv2d\) needs 2 spatial",
        ),
        ({"size": (64, 64, 3)}, ValueError, r"size=\(64, 64, 3\) has 3 dimension"),
        (
            {"size": (1, 3, 64, 64)},
            ValueError,
            r"needs 2 spatial dimension\(s\); size is the spatial size alone, size=\(64, 64\) "
            r"\(model_summary takes the full shape, \(1, 3, 64, 64\)\)",
        ),
        ({"size": (1, 4, 64, 64)}, ValueError, r"needs 2 spatial dimension\(s\)$"),  # not its channels
        ({"size": (0, 64)}, ValueError, r"size must be a sequence of positive ints, got size=\(0, 64\)"),
        ({"size": "64"}, ValueError, r"size must be a sequence of positive ints, got size='64'"),
        ({"modules": "head.*"}, ValueError, r"modules='head\.\*' matches no module of ResNetish"),
        ({"modules": []}, ValueError, r"modules=\[\] selects no module of ResNetish"),
        ({"engine": "gpu"}, ValueError, r"engine must be one of auto, meta, fake, real, got engine='gpu'"),
        ({"input": "pixels"}, TypeError, r"input must be a tensor, a tuple of positional inputs or a dict"),
        (
            {"input": torch.zeros(1, 3, 8, 8), "size": (8, 8)},
            ValueError,
            r"pass either size= or input=, not both",
        ),
        (
            {"size": torch.zeros(1, 3, 8, 8), "input": torch.zeros(1, 3, 8, 8)},
            ValueError,
            r"got input data both as size and as input=; pass it once",
        ),
    ],
)
def test_bad_arguments_name_the_argument_and_value(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    model = kwargs.pop("model", None)
    target = zoo.ResNetish() if model is None else model
    with pytest.raises(error, match=match):
        model_sizes(target, **kwargs)
    if isinstance(target, nn.Module):
        assert not any(module._forward_hooks or module._forward_pre_hooks for module in target.modules())


def test_tensors_given_as_the_size_are_the_input() -> None:
    model = zoo.ResNetish()
    batch = torch.randn(2, 3, 20, 20)
    expected = model_sizes(model, input=batch)
    assert list(model_sizes(model, batch)) == list(expected)
    assert model_sizes(model, batch)[0][0] == 2  # the batch given, not a dummy batch of one
    assert list(model_sizes(model, (batch,))) == list(expected)
    assert list(model_sizes(model, [batch])) == list(expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_an_input_on_another_device_is_named() -> None:
    with pytest.raises(ValueError, match=r"input is on cuda:0 but the weights of ResNetish are on cpu"):
        model_sizes(zoo.ResNetish(), input=torch.zeros(1, 3, 8, 8, device="cuda"))


def test_num_features_model() -> None:
    body = nn.Sequential(*list(zoo.ResNetish().children())[:-2])
    assert num_features_model(body) == 32
    assert num_features_model(zoo.mlp()) == 5


def test_num_features_model_retries_larger_inputs_only_for_size_errors() -> None:
    needs_big = nn.Sequential(nn.Conv2d(3, 12, 20), nn.ReLU(), nn.Conv2d(12, 7, 5))
    with untouched(needs_big):
        assert num_features_model(needs_big) == 7  # 8 and 16 are too small, 32 works
    with pytest.raises(LayerError, match=r"layer 'features.3' \(Conv2d, in_channels=64\)"):
        num_features_model(Broken())


def test_sizes_text_and_dict_are_deterministic() -> None:
    first = model_sizes(zoo.ResNetish(), (32, 32), modules="leaves")
    second = model_sizes(zoo.ResNetish(), (32, 32), modules="leaves")
    assert str(first) == str(second) and first.to_dict() == second.to_dict()
    assert "0x" not in str(first) + repr(first)


# -- a Hypothesis property: random stacks, sized by the library vs by a plain forward --

LAYER_KINDS = ["conv", "bn", "relu", "pool", "dropout"]


@st.composite
def conv_stacks(draw: st.DrawFn) -> tuple[nn.Sequential, tuple[int, int]]:
    channels = draw(st.integers(1, 4))
    side = draw(st.integers(8, 24))
    layers: list[nn.Module] = [nn.Conv2d(channels, (channels := draw(st.integers(1, 8))), 3, padding=1)]
    for kind in draw(st.lists(st.sampled_from(LAYER_KINDS), max_size=6)):
        if kind == "conv":
            stride = draw(st.integers(1, 2))
            out = draw(st.integers(1, 8))
            layers.append(
                nn.Conv2d(
                    channels, out, draw(st.sampled_from([1, 3])), stride, padding="same" if stride == 1 else 1
                )
            )
            channels = out
        elif kind == "bn":
            layers.append(nn.BatchNorm2d(channels))
        elif kind == "relu":
            layers.append(nn.ReLU(inplace=draw(st.booleans())))
        elif kind == "pool":
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        else:
            layers.append(nn.Dropout2d(0.5))
    if draw(st.booleans()):
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, draw(st.integers(1, 5)))]
    return nn.Sequential(*layers), (side, side)


@settings(max_examples=40, deadline=None)
@given(conv_stacks())
def test_model_sizes_matches_a_plain_forward_on_random_stacks(
    case: tuple[nn.Sequential, tuple[int, int]],
) -> None:
    model, size = case
    batch = dummy_batch(model, size)
    reference = observed_sizes(model, batch)
    with untouched(model):
        sizes = model_sizes(model, size)
    assert sizes.engine == "meta"
    assert {name: sizes.calls(name) for name in sizes.names} == reference


def test_a_compiled_model_is_traced_through_its_original_module() -> None:
    net = zoo.mlp()
    compiled = torch.compile(net)
    sizes = model_sizes(compiled, input=torch.zeros(2, 20))
    assert sizes == model_sizes(net, input=torch.zeros(2, 20))
    assert list(sizes.names) == ["0", "1", "2", "3", "4", "5"]  # not "_orig_mod"
    assert sizes.engine == "meta"


def test_containers_are_not_reported_as_never_ran() -> None:
    model = zoo.transformer_encoder()  # .layers is a ModuleList
    sizes = model_sizes(model, input=torch.zeros(1, 4, 32))
    assert sizes.never_ran == [] and sizes.containers == {"layers"} and sizes["layers"] is None
    assert "layers (ModuleList)  container, not called" in str(sizes)


def test_any_qualified_name_indexes_the_sizes_not_only_the_selected_layers() -> None:
    # the README's first example: sizes["encoder.stage2"] on a model whose child is `encoder`
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Sequential()
            self.encoder.add_module("stage1", nn.Conv2d(3, 8, 3, stride=2, padding=1))
            self.encoder.add_module("stage2", nn.Conv2d(8, 16, 3, stride=2, padding=1))
            self.blocks = nn.ModuleList([nn.ReLU(), nn.ReLU()])
            self.unused = nn.Linear(4, 4)
            self.head = nn.Flatten()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.encoder(x)
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    net = Net()
    sizes = model_sizes(net, (32, 32))
    seen = observed_sizes(net, torch.zeros(1, 3, 32, 32), modules="all")
    assert sizes.names == ("encoder", "blocks", "unused", "head")  # the positional view: children
    assert sizes["encoder.stage2"] == seen["encoder.stage2"][-1] == (1, 16, 8, 8)
    assert sizes["blocks.1"] == (1, 16, 8, 8) and sizes.calls("encoder.stage1") == [(1, 8, 16, 16)]
    assert sizes.ran("blocks.0") and not sizes.ran("unused")
    assert sizes["unused"] is None  # a selected layer that never ran
    with pytest.raises(KeyError, match=r"'unused.weight' is not a module of the model; the measured layers"):
        sizes["unused.weight"]
    nested = model_sizes(net, (32, 32), modules=["encoder", "head"])
    with pytest.raises(KeyError, match=r"'unused' \(Linear\) never ran in this forward"):
        nested["unused"]
    with pytest.raises(KeyError, match=r"'blocks' \(ModuleList\) is a container"):
        nested["blocks"]
    assert nested.names == ("encoder", "head") and len(nested) == 2  # the view stays as selected


def test_leaves_keep_a_layer_whose_only_child_never_runs() -> None:
    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 16)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.proj(x)
            return self.attn(h, h, h, need_weights=False)[0]

    sizes = model_sizes(Attend(), input=torch.zeros(1, 5, 8), modules="leaves")
    assert sizes.names == ("proj", "attn", "attn.out_proj")  # the attention is not lost
    assert sizes["attn"][0] == (1, 5, 16) and sizes.never_ran == ["attn.out_proj"]


def test_the_last_size_is_the_models_output_with_every_module_selected() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 8)
            self.head = nn.Linear(8, 3)
            self.unused = nn.Linear(2, 2)  # registered last, never runs

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x))

    sizes = model_sizes(Net(), input=torch.zeros(1, 4), modules="all")
    assert sizes.names == ("body", "head", "unused", "") and sizes[-1] == (1, 3)
