"""Tracing: the engines (meta, fake, real), the recorder's fast paths, and the model left as it was found."""

from __future__ import annotations

import json
import pickle
import re
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from pytest_modelhooks import (
    LayerError,
    dummy_eval,
    in_channels,
    input_spec,
    model_sizes,
    model_summary,
    num_features_model,
    trace_model,
)
from pytest_modelhooks._tree import map_tensors, shapes_of
from pytest_modelhooks.hooks import hooks_by_module, training_flags
from pytest_modelhooks.inputs import decoder_inputs
from pytest_modelhooks.tracing.dummy import fitting_spec
from tests import zoo
from tests.helpers import untouched


def test_dummy_eval_runs_in_eval_mode_and_restores_mixed_flags() -> None:
    model, _ = zoo.build("mixed_modes")
    modes: list[bool] = []
    handle = model.stem.register_forward_hook(lambda module, args, out: modes.append(module.training))
    flags = training_flags(model)
    out = dummy_eval(model, (16, 16))
    handle.remove()
    assert modes == [False] and out.shape == (1, 10) and not out.requires_grad
    assert training_flags(model) == flags


def test_a_bad_linear_in_a_deep_stack_is_named_on_every_engine() -> None:
    # plain Linear/ReLU/Dropout get stand-in forwards on the meta engine: a mismatch must still
    # read as torch's error, name the layer, and leave no stand-in behind
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(), nn.Linear(9, 2), nn.GELU())
    for engine in ["meta", "real"]:
        with untouched(model), pytest.raises(LayerError) as info:
            model_sizes(model, input=torch.zeros(3, 4), engine=engine)
        assert info.value.layer == "3"
        assert info.value.input_shapes == ((3, 8),)
        # torch's own wording: the CPU kernel's, or the meta kernel's
        assert re.search(r"3x8 and 9x2|\[3, 8\] X \[9, 2\]", str(info.value))


def test_sequential_children_are_recorded_alike_with_or_without_other_hooks() -> None:
    # a plain Sequential records its hook-free children itself; any other hook in play sends
    # every call down torch's ordinary path: both must see the same calls, and those hooks run
    from pytest_modelhooks import model_summary

    def build() -> nn.Module:
        torch.manual_seed(0)
        inner = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), inner, inner, nn.Conv1d(1, 2, 3), nn.Flatten())

    model = build()
    with untouched(model):
        fast = model_summary(model, input_data=torch.randn(2, 1, 4))
    seen: list[str] = []
    own = model[1].register_forward_hook(lambda module, args, out: seen.append("own"))
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: seen.append(type(module).__name__)
    )
    try:
        with untouched(model):
            ordinary = model_summary(model, input_data=torch.randn(2, 1, 4))
    finally:
        handle.remove()
        own.remove()
    assert fast.layers == ordinary.layers
    assert [row.label for row in fast.layers][:6] == ["Sequential", "0", "1", "2", "2.0", "2.1"]
    assert fast["2 [call 2]"].output_shapes == (2, 1, 8)
    assert seen.count("own") == 1 and seen.count("Linear") == 3  # the hooks ran, once per call


def test_a_child_with_its_own_hook_is_called_through_torch() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    calls: list[tuple[int, ...]] = []
    handle = model[0].register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0].shape)))
    try:
        sizes = model_sizes(model, input=torch.zeros(5, 3))
    finally:
        handle.remove()
    assert calls == [(5, 3)] and sizes["1"] == (5, 3)


def test_a_dtype_mismatch_inside_a_sequential_reads_as_torchs_error() -> None:
    # the shape rules defer on anything unusual: the real forward raises torch's own error
    model = nn.Sequential(nn.ReLU(), nn.Linear(4, 4), nn.Tanh())
    messages = []
    for engine in ["meta", "real"]:
        with untouched(model), pytest.raises(LayerError) as info:
            model_sizes(model, input=torch.zeros(2, 4, dtype=torch.bfloat16), engine=engine)
        assert info.value.layer == "1" and info.value.input_shapes == ((2, 4),)
        messages.append(str(info.value.original))
    assert all("dtype" in message for message in messages), messages


class GroupedExperts(nn.Module):
    """Two experts through torch._grouped_mm, as Mixtral-style MoE layers run them: the CPU
    kernel takes float32, torch's meta kernel demands bfloat16."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 4, 8))  # rows of 16-byte multiples, as the CPU needs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offsets = torch.tensor([2, 4], dtype=torch.int32, device=x.device)
        return torch._grouped_mm(x, self.weight, offs=offsets)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm is newer than this torch")
def test_a_check_only_meta_kernels_make_moves_on_to_a_real_forward(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_modelhooks.tracing import dispatch as _dispatch

    model = nn.Sequential(nn.Linear(4, 4), GroupedExperts())
    batch = torch.randn(4, 4)
    with untouched(model):
        own = model_sizes(model, input=batch)  # the meta engine answers grouped_mm itself
        # without that answer, torch's meta kernel (and so the fake one) objects to float32
        # where the CPU kernel does not: the trace moves on to a real forward
        monkeypatch.delitem(_dispatch._HANDLERS, torch.ops.aten._grouped_mm.default)
        sizes = model_sizes(model, input=batch)
    assert own.engine == "meta" and own["1"] == sizes["1"] == (4, 8)
    if sizes.engine == "meta":
        pytest.skip("this torch's grouped_mm meta kernel takes float32: nothing to move on from")
    assert sizes.engine == "real"
    assert "fake_tensor" not in capfd.readouterr().err  # torch's fake-kernel error log stays quiet


def test_attention_mult_adds_agree_on_meta_and_a_real_cpu_forward() -> None:
    # the CPU runs scaled_dot_product_attention as one fused op; meta decomposes it into matmuls
    from pytest_modelhooks import model_summary

    class Attention(nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = torch.randn(2, 4, 10, 8), torch.randn(2, 4, 12, 8), torch.randn(2, 4, 12, 6)
    meta = model_summary(Attention(), input_data=(q, k, v))
    real = model_summary(Attention(), input_data=(q, k, v), engine="real")
    assert meta.engine == "meta"
    assert meta.mult_adds == real.mult_adds == 2 * 4 * 10 * 12 * (8 + 6)


class Reversed(nn.Sequential):
    """A Sequential whose own iteration order runs its children last to first."""

    def __iter__(self) -> Any:
        return reversed(list(self._modules.values()))


def test_scripted_children_and_sequentials_with_their_own_order() -> None:
    # neither may be recorded by the Sequential shortcut: a scripted class raises on .forward,
    # and a subclass's iteration decides the order of calls
    from pytest_modelhooks import model_summary

    scripted = torch.jit.script(nn.Linear(4, 4))
    model = nn.Sequential(nn.Linear(3, 4), scripted, nn.ReLU(), Reversed(nn.Linear(5, 4), nn.Linear(4, 5)))
    batch = torch.randn(2, 3)
    with untouched(model):
        meta = model_summary(model, input_data=batch)
        real = model_summary(model, input_data=batch, engine="real")
    assert meta.engine == "meta" and meta.layers == real.layers
    assert [row.label for row in meta.layers][-2:] == ["3.1", "3.0"]
    assert meta.output_shapes == (2, 4)
    model.eval()  # the scripted module keeps its flag in C++: nothing of ours may shadow it
    assert scripted.training is False


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("/env/lib/python3.11/site-packages/torch/_meta_registrations.py", True),
        ("/env/lib/python3.11/site-packages/torch/_refs/__init__.py", True),
        ("/env/lib/python3.11/site-packages/torch/_subclasses/fake_impls.py", True),
        ("/env/lib/python3.11/site-packages/torch/nn/modules/linear.py", False),
        ("/home/me/torch/myproject/_refs/layers.py", False),  # a user's folder named torch
        ("/home/me/project/model.py", False),
    ],
)
def test_only_errors_out_of_torchs_meta_kernels_count_as_engine_limits(filename: str, expected: bool) -> None:
    from pytest_modelhooks.tracing.engines import is_engine_limitation as _is_engine_limitation

    code = compile("raise RuntimeError('shapes do not match')", filename, "exec")
    with pytest.raises(RuntimeError) as info:
        exec(code)
    assert _is_engine_limitation(info.value) is expected


@pytest.mark.parametrize("engine", ["auto", "meta", "fake", "real"])
def test_an_uninitialized_lazy_model_is_refused_and_left_lazy(engine: str) -> None:
    # A lazy module's first forward materializes its parameters and changes its class: tracing
    # must not do that behind the user's back, and must say which layer and what to do.
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.LazyLinear(2))
    refused = r"layer '2' \(LazyLinear\) has uninitialized parameters.*real batch"
    with pytest.raises(ValueError, match=refused):
        model_sizes(model, input=torch.randn(3, 4), engine=engine)
    assert type(model[2]) is nn.LazyLinear and model[2].has_uninitialized_params()
    assert not model[2]._forward_hooks and len(model[2]._forward_pre_hooks) == 1  # its own initializer


def test_a_lazy_model_works_once_initialized_and_in_channels_refuses_before() -> None:
    model = nn.Sequential(nn.LazyConv2d(8, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"layer '0' \(LazyConv2d\) has uninitialized"):
        in_channels(model)
    model(torch.randn(1, 5, 16, 16))  # the user's own first forward
    assert in_channels(model) == 5
    assert model_sizes(model, (16, 16))[-1] == (1, 8, 14, 14)


def jagged(*lengths: int, features: int = 4) -> torch.Tensor:
    torch.manual_seed(0)
    parts = [torch.randn(length, features) for length in lengths]
    return torch.nested.nested_tensor(parts, layout=torch.jagged)


class OnNested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.proj(x))


def test_nested_tensors_get_a_size_with_their_ragged_dimension() -> None:
    model = OnNested()
    with untouched(model):
        sizes = model_sizes(model, input=jagged(2, 5, 3), modules="all")
    assert sizes.engine == "real"  # torch makes no meta or fake copies of nested tensors
    assert sizes["proj"] == (3, None, 6) and sizes["proj"].spans == {1: (2, 5)}
    lines = [" ".join(line.split()) for line in str(sizes).splitlines()]
    assert "proj (Linear) (3, 2..5, 6)" in lines
    assert json.loads(json.dumps(sizes.to_dict()))["proj"]["calls"] == [[3, None, 6]]
    same = model_sizes(model, input=jagged(4, 4, 4), modules="all")
    assert type(same["proj"]).__name__ == "NestedSize" and same["proj"] == (3, 4, 6)
    with pytest.raises(ValueError, match="engine='meta' cannot run a nested tensor input"):
        model_sizes(model, input=jagged(2, 3), engine="meta")
    with torch.device("meta"):
        on_meta = OnNested()
    with pytest.raises(
        ValueError, match="a nested tensor input runs only on the real engine, and its weights"
    ):
        model_sizes(on_meta, input=jagged(2, 3))


def test_strided_nested_tensors_too() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: the strided layout is a prototype
        x = torch.nested.nested_tensor([torch.ones(2, 3, 4), torch.ones(2, 5, 4)])
    size = shapes_of(x)
    assert size == (2, 2, None, 4) and size.spans == {2: (3, 5)}
    assert pickle.loads(pickle.dumps(size)).spans == size.spans  # crosses xdist workers intact


def test_packed_sequences_keep_their_batch_sizes_on_the_cpu_for_meta() -> None:
    # torch refuses a PackedSequence whose batch_sizes left the CPU
    lstm = nn.LSTM(8, 16, batch_first=True)
    lengths = torch.tensor([5, 3, 2])
    packed = pack_padded_sequence(torch.randn(3, 5, 8), lengths, batch_first=True, enforce_sorted=False)
    with untouched(lstm):
        sizes = model_sizes(lstm, input=(packed,))
    assert sizes.engine == "meta"
    (data, batch_sizes, sorted_indices, unsorted_indices), (hidden, cell) = sizes[0]
    assert (data, batch_sizes, sorted_indices, unsorted_indices) == ((10, 16), (5,), (3,), (3,))
    assert hidden == cell == (1, 3, 16)
    moved = map_tensors(packed, lambda tensor: tensor.to("meta"))
    assert moved.data.is_meta and moved.sorted_indices.is_meta and moved.batch_sizes.device.type == "cpu"


def test_a_model_whose_forward_takes_no_input_is_run_without_one() -> None:
    # a generator drawing its own noise, a decoder of learned queries: the dummy input was a
    # batch its forward() could not take
    class Queries(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.queries = nn.Parameter(torch.randn(1, 5, 8))
            self.decode = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))

        def forward(self) -> torch.Tensor:
            return self.decode(self.queries)

    model = Queries()
    with untouched(model):
        assert model_summary(model).output_shapes == (1, 5, 4)
        assert list(model_sizes(model)) == [(1, 5, 4)]
        assert dummy_eval(model).shape == (1, 5, 4) and num_features_model(model) == 5
        with pytest.raises(
            ValueError, match=r"size=\(8, 8\) was given, but Queries\.forward\(\) takes no input"
        ):
            model_sizes(model, (8, 8))


def test_a_model_without_children_is_its_own_layer() -> None:
    sizes = model_sizes(nn.Linear(3, 4), input=torch.zeros(2, 3))
    assert sizes.names == ("",) and sizes[0] == (2, 4)


@pytest.fixture
def process_group(tmp_path) -> Iterator[None]:
    """A one-process gloo group, as DistributedDataParallel and FSDP2 need."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch has no torch.distributed with gloo")
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'store'}")
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_data_parallel_wrappers_list_the_wrapped_models_layers(process_group) -> None:
    model = zoo.ResNetish()
    plain = model_sizes(model, (16, 16))
    wrapped = model_sizes(nn.DataParallel(model), (16, 16))  # no GPU: a plain call
    assert wrapped.names == tuple(f"module.{name}" for name in plain.names)
    assert list(wrapped) == list(plain)
    assert model_sizes(nn.DataParallel(nn.LSTM(4, 8)), input=torch.zeros(3, 2, 4)).names == ("module",)
    ddp = nn.parallel.DistributedDataParallel(model)
    with untouched(ddp):
        assert model_sizes(ddp, (16, 16)).names == wrapped.names
        assert list(model_sizes(ddp, (16, 16))) == list(plain)


def test_a_model_sharded_by_fsdp2_is_refused_before_anything_runs(process_group) -> None:
    # a trace swapping parameters under FSDP2's own swapping left it half-initialised: the
    # next plain forward failed
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    expected = model(torch.ones(3, 8))
    fully_shard(model[0])
    fully_shard(model)
    hooks = hooks_by_module(model)  # FSDP2's own
    refused = (
        r"cannot trace FSDPSequential: the model is sharded by fully_shard \(FSDP2\)\. .*before sharding"
    )
    for call in (
        lambda: model_summary(model, (2, 8)),
        lambda: model_sizes(model, (8,)),
        lambda: model_sizes(model),
    ):
        with pytest.raises(TypeError, match=refused):
            call()
    assert hooks_by_module(model) == hooks
    assert torch.allclose(model(torch.ones(3, 8)), expected)  # it still trains and runs
    model(torch.randn(4, 8)).sum().backward()
    assert dummy_eval(model).shape == (1, 2)  # a plain forward: it runs
    broken = nn.Sequential(nn.Linear(8, 16), nn.Linear(17, 2))
    fully_shard(broken)
    with pytest.raises(RuntimeError, match=r"cannot be multiplied \(1x16 and 17x2\)"):
        dummy_eval(broken)  # the model's own error, as the forward raised it


def test_a_model_with_dtensor_parameters_is_refused(process_group) -> None:
    from torch.distributed.tensor import Replicate, distribute_tensor, init_device_mesh

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    mesh = init_device_mesh("cpu", (1,))
    model[2].weight = nn.Parameter(distribute_tensor(model[2].weight.detach(), mesh, [Replicate()]))
    with (
        untouched(model),
        pytest.raises(TypeError, match=r"parameter '2\.weight' is a DTensor \(tensor parallelism\)"),
    ):
        model_summary(model, (2, 8))


class Checkpointed(nn.Module):
    """Blocks under activation checkpointing, both flavours, as large models train."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.second = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        x = checkpoint(self.first, x, use_reentrant=False)
        x = checkpoint(self.second, x, use_reentrant=True)
        return self.head(x)


@pytest.mark.parametrize("engine", ["meta", "fake", "real"])
def test_checkpointed_blocks_trace_without_torchs_no_grad_warning(engine: str) -> None:
    # Reentrant checkpointing warns that no input needs a gradient, which is only true because
    # the trace runs under no_grad: under `filterwarnings = error` that failed every summary.
    model = Checkpointed()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sizes = model_sizes(model, input=torch.randn(4, 8), modules="all", engine=engine)
        assert dummy_eval(model, (3,)).shape == (1, 3, 2)  # a batch of one, 3 positions
    assert sizes["second.0"] == (4, 8) and sizes[-1] == (4, 2)
    # the user's own no_grad forward still warns: only the trace is quiet
    with torch.no_grad(), pytest.warns(UserWarning, match="None of the inputs have requires_grad"):
        model(torch.randn(4, 8))


class KeepsARunningMean(nn.Module):
    """Updates a buffer in every forward, eval mode too, and branches on values (so only a
    real forward can run it)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("running", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        self.running.mul_(0.5).add_(y.mean(0))
        return y if y.sum() > -1e9 else -y


@pytest.mark.parametrize("engine", ["auto", "real"])
def test_the_real_engine_writes_to_copies_of_the_buffers(engine: str) -> None:
    model = KeepsARunningMean()
    with untouched(model):
        sizes = model_sizes(model, input=torch.randn(2, 4), engine=engine)
    assert sizes.engine == "real"
    model(torch.randn(2, 4))  # the model's own buffer still works after the trace
    assert model.running.abs().sum() > 0


def test_an_embedding_with_max_norm_keeps_its_weights() -> None:
    # each lookup renormalises the rows it reads, in place: a real forward changed the weights
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=0.5), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.mul_(10)
    with untouched(model), warnings.catch_warnings():
        warnings.simplefilter("error")
        for engine in ("meta", "fake", "real"):
            summary = model_summary(model, input_data=torch.tensor([[1, 2, 3]]), engine=engine)
            assert summary.total_params == 50


def test_a_parameter_changed_in_place_by_a_real_forward_is_named() -> None:
    class Clamps(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.linear.weight.clamp_(-0.1, 0.1)  # (under the trace's no_grad)
            return self.linear(x)

    with pytest.warns(UserWarning, match=r"changed parameters in place \(linear.weight\)") as record:
        model_sizes(Clamps(), input=torch.randn(2, 4), engine="real")
    assert record[0].filename == __file__  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model_sizes(Clamps(), input=torch.randn(2, 4), engine="meta")  # stand-ins: nothing to say


class HeadFirst(nn.Module):
    """Declares its head before the backbone that runs first."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.head = nn.Linear(16, classes)
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_a_model_declaring_its_head_first_is_sized_from_the_layer_that_reads_the_input() -> None:
    model = HeadFirst()
    with untouched(model):
        sizes = model_sizes(model, (32, 32))
        summary = model_summary(model)
    assert sizes["features"] == (1, 16) and sizes["head"] == (1, 10)
    assert summary.input_shapes == (1, 3, 64, 64) and summary.total_params == 16 * 3 * 9 + 16 + 170
    assert num_features_model(HeadFirst(classes=7)) == 7


def test_dummy_eval_finds_the_layer_that_reads_the_input_or_names_the_failing_one() -> None:
    model = HeadFirst().train()
    with untouched(model):
        assert dummy_eval(model, (16, 16)).shape == (1, 10)
    broken = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(64, 10))
    named = r"^layer '2' \(Linear, in_features=64\) got input"
    with untouched(broken), pytest.raises(LayerError, match=named):
        dummy_eval(broken)


def test_dummy_eval_keeps_the_models_own_error_as_the_original() -> None:
    class Refuses(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError("this model wants a mask")

    model = Refuses().train()
    with untouched(model), pytest.raises(LayerError, match="wants a mask") as info:
        dummy_eval(model)
    assert isinstance(info.value.original, ValueError)  # as model_sizes reports it


def test_a_real_shape_bug_after_the_first_layer_is_reported_as_it_is() -> None:
    broken = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(64, 10))  # 32 != 64
    message = r"^layer '2' \(Linear, in_features=64\) got input \(1, 32\): RuntimeError: [^;]*$"
    with untouched(broken), pytest.raises(LayerError, match=message) as info:
        model_sizes(broken)
    assert info.value.layer == "2" and info.value.input_shapes == ((1, 32),)
    assert info.value.finished == ("0", "1")
    with pytest.raises(LayerError, match=message):
        model_summary(broken)


def test_a_batch_that_fits_no_layer_says_which_layer_it_was_made_for() -> None:
    # the batch for 'head' fails at 'features.0', the first to run; the retry's batch, made for
    # 'features.0', then fails at 'extra' (16 channels into 4): the first error is raised
    class HeadFirstBroken(HeadFirst):
        def __init__(self) -> None:
            super().__init__()
            self.features[0] = nn.Conv2d(5, 16, 3)
            self.extra = nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.extra(self.features[0](x)).flatten(1))

    message = (
        r"layer 'features.0' \(Conv2d, in_channels=5\) got input \(1, 16\).*"
        r"the input was made for layer 'head' \(Linear\), the first layer with parameters"
    )
    with untouched(model := HeadFirstBroken()), pytest.raises(LayerError, match=message):
        model_sizes(model)


class AnchorsLike(nn.Module):
    """torchvision's AnchorGenerator in small: a plain list of tensors rewritten in every
    forward, a cache made on first use, then a data-dependent op (only a real forward runs it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.cell_anchors = [torch.arange(8.0).view(2, 4)]
        self.scales = {"base": torch.ones(4)}
        self.cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.cell_anchors = [anchor.to(x.device, x.dtype) * 1 for anchor in self.cell_anchors]
        self.scales["seen"] = x.new_ones(4)
        if self.cache is None:
            self.cache = x.new_full((4,), 2.0)
        y = self.conv(x) * self.cache.view(1, 4, 1, 1)
        keep = (y.flatten(1) > 0).any(0).nonzero()  # data-dependent: no meta or fake kernel
        return y, self.cell_anchors[0].sum() + keep.shape[0]


@pytest.mark.parametrize("engine", ["auto", "meta", "fake", "real"])
def test_tensors_in_python_attributes_are_put_back_whatever_the_engine(engine: str) -> None:
    torch.manual_seed(0)
    model = AnchorsLike()
    batch = torch.randn(2, 3, 8, 8)
    expected = model(batch)
    model.cache = None  # as built
    model.scales.pop("seen")
    anchors, scales = model.cell_anchors, model.scales
    try:
        model_summary(model, input_data=batch, engine=engine)
    except LayerError:
        assert engine in ("meta", "fake")  # the nonzero: these engines cannot run it
    assert model.cell_anchors is anchors and model.cell_anchors[0].device.type == "cpu"
    assert type(model.cell_anchors[0]) is torch.Tensor  # not a FakeTensor left behind
    assert model.scales is scales and set(model.scales) == {"base"} and model.cache is None
    again = model(batch)  # the model still works, and gives what it gave
    torch.testing.assert_close(again[0], expected[0])
    torch.testing.assert_close(again[1], expected[1])


def test_the_auto_engine_falls_back_to_a_real_forward_with_the_attributes_put_back() -> None:
    model = AnchorsLike()
    summary = model_summary(model, input_data=torch.randn(1, 3, 8, 8))
    assert summary.engine == "real" and summary.total_params == 3 * 4 * 9 + 4
    sizes = model_sizes(model, input=torch.randn(1, 3, 8, 8), modules="all")
    assert sizes.engine == "real" and sizes["conv"] == (1, 4, 8, 8)
    assert model.cache is None and len(model.cell_anchors) == 1


def test_state_put_back_covers_a_reused_module_tuples_and_a_failing_forward() -> None:
    class Caching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.pair = (torch.zeros(4), "tag")  # a tuple attribute, rebound in forward

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.pair = (x.mean(0), "seen")
            return self.proj(x) + self.pair[0]

    shared = Caching()
    model = nn.Sequential(shared, shared)  # the same module twice
    original = shared.pair
    model_summary(model, input_data=torch.randn(2, 4))
    assert shared.pair is original

    class Broken(Caching):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.pair = (x.mean(0), "seen")
            raise RuntimeError("no")

    broken = Broken()
    before = broken.pair
    with pytest.raises(LayerError):
        model_sizes(broken, input=torch.randn(2, 4))
    assert broken.pair is before  # put back although every engine failed


def test_a_lone_tensor_is_one_input_and_anything_else_but_a_tuple_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    batch = torch.zeros(2, 4)
    as_tuple = trace_model(model, (batch,))
    alone = trace_model(model, batch)  # not unpacked into its two rows
    assert [call.output_shapes for call in alone.calls] == [call.output_shapes for call in as_tuple.calls]
    assert alone.calls[-1].output_shapes == torch.Size([2, 3])
    with pytest.raises(TypeError, match=r"args must be a tuple .* got a dict; wrap a single input"):
        trace_model(model, {"input": batch})  # type: ignore[arg-type]


def _strided_stem() -> nn.Sequential:
    # 64x64 -> 8x8 -> 1x1, then a 3x3 kernel has nothing to read: the stem needs 75x75 or more
    return nn.Sequential(nn.Conv2d(3, 8, 7, stride=8), nn.Conv2d(8, 8, 5, stride=4), nn.Conv2d(8, 4, 3))


def test_a_stem_too_deep_for_the_default_image_is_traced_at_224() -> None:
    model = _strided_stem().train()
    with untouched(model):
        assert model_summary(model).input_shapes == (1, 3, 224, 224)
        real = model(torch.zeros(1, 3, 224, 224)).shape  # (1, 4, 4, 4)
        assert model_sizes(model)["2"] == real and dummy_eval(model).shape == real
        spec = fitting_spec(model)
    assert spec.default_size == (224, 224)
    assert spec.size_from.startswith(
        "as the forward refused 64x64 (layer '2' (Conv2d, in_channels=8) got input"
    )
    with pytest.raises(LayerError, match=r"layer '2' \(Conv2d, in_channels=8\) got input \(1, 8, 1, 1\)"):
        model_sizes(model, (64, 64))  # a size given is the size used


def test_inception_sized_stems_are_traced_at_299() -> None:
    # 224 -> 28 -> 6: a 7x7 kernel needs the 299x299 image (-> 37 -> 8)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 7, stride=8, padding=2), nn.Conv2d(8, 8, 5, stride=4), nn.Conv2d(8, 4, 7)
    )
    assert model_summary(model).input_shapes == (1, 3, 299, 299)
    assert fitting_spec(model).default_size == (299, 299)


def test_a_video_stem_too_deep_for_the_default_clip_is_traced_at_16x112x112() -> None:
    model = nn.Sequential(nn.Conv3d(3, 8, (1, 7, 7), stride=(1, 8, 8)), nn.Conv3d(8, 4, (3, 3, 3)))
    assert model_summary(model).input_shapes == (1, 3, 16, 112, 112)


def test_a_shape_bug_is_reported_at_the_default_size_even_where_a_larger_one_would_run() -> None:
    # the stem runs at 64x64, then the head is wrong for any size: the 64x64 error stands
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(10, 2))
    with (
        untouched(model),
        pytest.raises(LayerError, match=r"^layer '2' \(Linear, in_features=10\) got input \(1, 30752\)"),
    ):
        model_summary(model)
    assert fitting_spec(model) == input_spec(model)  # no batch fits: the forward will say why


class Waveform(nn.Module):
    """wav2vec 2.0's feature encoder in small: raw audio (B, L), a channel added for the first
    convolution; ``strides`` convolutions of kernel 10, stride 5."""

    def __init__(self, strides: int = 1) -> None:
        super().__init__()
        layers = [nn.Conv1d(1, 8, 10, stride=5)] + [nn.Conv1d(8, 8, 10, stride=5) for _ in range(strides - 1)]
        self.convs = nn.Sequential(*layers)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.convs(audio.unsqueeze(1))


def test_a_model_adding_the_channel_to_raw_audio_gets_a_waveform() -> None:
    model = Waveform().train()
    with untouched(model):
        assert model_summary(model).input_shapes == (1, 64)
        assert model_sizes(model, (500,))["convs"] == model(torch.zeros(1, 500)).shape
        assert dummy_eval(model).shape == (1, 8, 11)
    spec = fitting_spec(model)
    assert (spec.layout, spec.size_from) == ("waveform", "a waveform (the forward adds its channel)")


def test_a_waveform_too_short_for_the_encoder_is_made_3000_samples_long() -> None:
    model = Waveform(strides=4)  # 64 samples -> 11 -> 1: the third convolution has too few
    summary = model_summary(model)
    assert summary.input_shapes == (1, 3000)
    assert summary.output_shapes == model(torch.zeros(1, 3000)).shape
    assert fitting_spec(model).size_from.startswith(
        "a waveform (the forward adds its channel), as the forward refused 64 (layer 'convs.2' (Conv1d"
    )


def test_a_model_checking_its_length_gets_the_3000_frames_of_whisper() -> None:
    class MelEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(80, 8, 3, padding=1)

        def forward(self, mel: torch.Tensor) -> torch.Tensor:
            if mel.shape[-1] != 3000:
                raise ValueError(f"expects 3000 mel frames, found {mel.shape[-1]}")
            return self.conv(mel)

    assert model_summary(MelEncoder()).input_shapes == (1, 80, 3000)
    with pytest.raises(LayerError, match="expects 3000 mel frames, found 500"):
        model_summary(MelEncoder(), (1, 80, 500))


class Seq2Seq(nn.Module):
    """An encoder-decoder as transformers writes one: it refuses to run without decoder ids."""

    class config:  # (an attribute, as transformers names it)
        is_encoder_decoder = True
        vocab_size = 30

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.head = nn.Linear(8, 30)

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor | None = None) -> torch.Tensor:
        if decoder_input_ids is None:
            raise ValueError("You have to specify either decoder_input_ids or decoder_inputs_embeds")
        memory = self.embed(input_ids).mean(1, keepdim=True)
        return self.head(self.embed(decoder_input_ids) + memory)


def test_an_encoder_decoder_gets_decoder_ids_beside_its_input() -> None:
    model = Seq2Seq()
    with untouched(model):
        summary = model_summary(model)
        out = dummy_eval(model)
    assert summary.input_shapes == ((1, 8), {"decoder_input_ids": (1, 8)})
    assert summary.output_shapes == out.shape == (1, 8, 30)
    ids = torch.zeros(1, 5, dtype=torch.long)
    assert model_sizes(model, (4,), decoder_input_ids=ids)["head"] == (1, 5, 30)  # as given
    assert decoder_inputs(model, {"labels": ids}) == {}  # (transformers makes them from the labels)
    given = model_summary(model, (3, 5))  # an encoder's input_size: decoder ids for each sample
    assert given.input_shapes == ((3, 5), {"decoder_input_ids": (3, 8)})
    assert given.output_shapes == (3, 8, 30)
    assert decoder_inputs(zoo.TiedLM()) == {}  # no encoder-decoder


def test_a_shape_bug_pays_one_real_forward_not_one_per_larger_size() -> None:
    # the larger sizes are tried on stand-ins only: the real engine runs once, at 64x64
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(10, 2))
    real: list[tuple[int, ...]] = []
    handle = model[0].register_forward_hook(
        lambda module, args, out: (
            real.append(tuple(args[0].shape))
            if type(args[0]) is torch.Tensor and args[0].device.type == "cpu"
            else None
        )
    )
    with pytest.raises(LayerError, match=r"got input \(1, 30752\)"):
        model_summary(model)
    handle.remove()
    assert real == [(1, 3, 64, 64)]
