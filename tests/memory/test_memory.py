"""model_memory and max_batch_size: the memory of a training step on fake tensors, checked
against a real step and against what autograd saves in a real forward."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint
from torch.utils.module_tracker import ModuleTracker

from pytest_modelhooks import HealthError, LayerError
from pytest_modelhooks.memory import MemoryReport, format_bytes, max_batch_size, model_memory, parse_bytes
from tests import zoo
from tests.helpers import untouched

TRAINABLE = [
    *("resnetish", "mlp", "conv1d", "gru", "transformer", "unet", "tied_lm", "reused"),
    # nested outputs, two inputs, frozen layers, mixed train/eval modes
    *("tuple_out", "dict_out", "dataclass_out", "two_inputs", "partly_frozen", "mixed_modes"),
]


class Checkpointed(nn.Module):
    """A block run under torch.utils.checkpoint: it keeps its input, not its insides."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.inp = nn.Linear(16, 64)
        self.block = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.GELU())
        self.out = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.out(h)


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes()


class _Creators(TorchDispatchMode):
    """The reference: each storage (by data pointer, every tensor kept alive) and the innermost
    module running when it was first produced, as torch's ModuleTracker names it."""

    def __init__(self, tracker: ModuleTracker, names: dict[str, str]) -> None:
        super().__init__()
        self.tracker, self.names = tracker, names
        self.creator: dict[int, str] = {}
        self.kept: list[torch.Tensor] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided:
                self.kept.append(tensor)
                parents = [self.names[p] for p in self.tracker.parents if p in self.names]
                innermost = max(
                    parents, key=lambda name: (name.count(".") + bool(name), len(name)), default=""
                )
                self.creator.setdefault(tensor.untyped_storage().data_ptr(), innermost)
        return out


def _saved_in_a_real_forward(model: nn.Module, inputs: tuple[Any, ...]) -> tuple[dict[str, int], int]:
    """Per module (by name), the bytes of the storages autograd saves in a real train-mode
    forward that the module made, each storage once, parameters and buffers left out; and the
    saved bytes of the input batch."""
    root = type(model).__name__
    names = {root: ""} | {f"{root}.{name}": name for name, _ in model.named_modules() if name}
    excluded = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    given = {t.untyped_storage().data_ptr(): _bytes(t) for t in inputs if isinstance(t, torch.Tensor)}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in excluded:
            saved[pointer] = _bytes(tensor)
        return tensor

    model.train()
    with (
        ModuleTracker() as tracker,
        _Creators(tracker, names) as creators,
        torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
    ):
        output = model(*inputs)
    per_module: dict[str, int] = {}
    for pointer, nbytes in saved.items():
        if pointer in given:
            continue
        name = creators.creator.get(pointer, "")
        per_module[name] = per_module.get(name, 0) + nbytes
    del output
    return per_module, sum(nbytes for pointer, nbytes in saved.items() if pointer in given)


def _per_module(report: MemoryReport) -> dict[str, int]:
    found: dict[str, int] = {}
    for layer in report:
        name = layer.name.split(" [call ")[0]
        if layer.saved_bytes:
            found[name] = found.get(name, 0) + layer.saved_bytes
    return found


def _zoo(name: str) -> tuple[nn.Module, tuple[Any, ...]]:
    model, batch = zoo.build(name)
    return model, batch if isinstance(batch, tuple) else (batch,)


@pytest.mark.parametrize("name", TRAINABLE)
def test_saved_bytes_per_module_equal_what_autograd_saves_in_a_real_forward(name: str) -> None:
    model, inputs = _zoo(name)
    report = model_memory(model, inputs, optimizer=None)
    expected, input_saved = _saved_in_a_real_forward(model, inputs)
    assert _per_module(report) == {name: count for name, count in expected.items() if count}
    assert sum(layer.saved_bytes for layer in report) + input_saved == sum(expected.values()) + input_saved
    assert report.saved_bytes <= sum(expected.values()) + input_saved  # what is still held at the peak


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_a_checkpointed_block_saves_its_input_only(reentrant: bool) -> None:
    torch.manual_seed(0)
    model, batch = Checkpointed(reentrant), torch.randn(32, 16)
    plain = Checkpointed(reentrant)
    plain.forward = lambda x: plain.out(plain.block(plain.inp(x)))  # type: ignore[method-assign]
    report, without = model_memory(model, batch, optimizer=None), model_memory(plain, batch, optimizer=None)
    # what the block saves inside is dropped and recomputed; its output is saved by `out`
    assert sum(report[f"block.{i}"].saved_bytes for i in range(3)) == 0
    assert sum(without[f"block.{i}"].saved_bytes for i in range(3)) > 0
    assert report["block.3"].saved_bytes == without["block.3"].saved_bytes
    assert report.peak_bytes == model_memory(model, batch, optimizer=None, engine="real").peak_bytes
    expected, _ = _saved_in_a_real_forward(model, (batch,))
    assert _per_module(report) == {name: count for name, count in expected.items() if count}


@pytest.mark.parametrize("name", TRAINABLE)
@pytest.mark.parametrize("optimizer", ["adamw", "sgd-momentum", None])
def test_the_fake_step_measures_what_a_real_step_allocates(name: str, optimizer: str | None) -> None:
    model, inputs = _zoo(name)
    with untouched(model):
        fake = model_memory(model, inputs, optimizer=optimizer)
        real = model_memory(model, inputs, optimizer=optimizer, engine="real")
    assert fake.to_dict() == {**real.to_dict()}
    assert sum(real.by_category().values()) == real.peak_bytes
    assert all(param.grad is None for param in model.parameters())


@pytest.mark.parametrize("given", ["a slice", "an expanded sample"])
def test_a_batch_that_is_a_view_is_measured_as_the_tensor_given(given: str) -> None:
    # the first convolution saves its input: a slice of a larger batch is the slice's bytes,
    # as the real engine's copy of it is, not those of the batch it was cut from
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(1, 3, 16, 16))
    batch = (
        torch.randn(8, 3, 16, 16)[:2]
        if given == "a slice"
        else torch.randn(1, 3, 16, 16).expand(2, -1, -1, -1)
    )
    fake = model_memory(model, batch)
    assert fake.to_dict() == model_memory(model, batch, engine="real").to_dict()
    assert fake.to_dict() == model_memory(model, batch.clone()).to_dict()


def _transposed_gradient_cases() -> dict[str, tuple[Any, tuple[Any, ...]]]:
    """A backward kernel given a gradient laid out transposed (Swin's windows undone by a
    permute), and its arguments: the real kernels lay their result out as their input."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(4, 16, 8), torch.randn(8), torch.randn(8)
    grad = torch.randn(4, 8, 16).transpose(1, 2)
    _, mean, rstd = torch.ops.aten.native_layer_norm(x, [8], weight, bias, 1e-5)
    image, image_grad = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4).transpose(2, 3)
    _, saved_mean, saved_invstd = torch.ops.aten.native_batch_norm(
        image, weight, bias, None, None, True, 0.1, 1e-5
    )
    log_probs = torch.randn(4, 16, 8).log_softmax(-1)
    aten = torch.ops.aten
    return {
        "layer norm": (
            aten.native_layer_norm_backward.default,
            (grad, x, [8], mean, rstd, weight, bias, [True] * 3),
        ),
        "batch norm": (
            aten.native_batch_norm_backward.default,
            (image_grad, image, weight, None, None, saved_mean, saved_invstd, True, 1e-5, [True] * 3),
        ),
        "channels-last batch norm": (
            aten.native_batch_norm_backward.default,
            (
                image_grad,
                image.contiguous(memory_format=torch.channels_last),
                *(weight, None, None, saved_mean, saved_invstd, True, 1e-5, [True] * 3),
            ),
        ),
        "log softmax": (aten._log_softmax_backward_data.default, (grad, log_probs, -1, torch.float32)),
    }


@pytest.mark.parametrize("case", list(_transposed_gradient_cases()))
def test_a_gradient_that_arrives_transposed_is_laid_out_on_fake_tensors_as_the_real_kernel_lays_it(
    case: str,
) -> None:
    from pytest_modelhooks._torch import fake_tensor_mode
    from pytest_modelhooks.memory.kernels import fake_kernel

    func, args = _transposed_gradient_cases()[case]
    real = func(*args)
    real = real if isinstance(real, torch.Tensor) else real[0]
    with fake_tensor_mode() as mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        fake = fake_kernel(func, fake_args, {})
        fake = fake if isinstance(fake, torch.Tensor) else fake[0]
        assert (fake.shape, fake.stride()) == (real.shape, real.stride())


class Experts(nn.Module):
    """A mixture of experts' layers in one ``torch._grouped_mm`` call, in float32."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.randn(4, 16, 32) / 4)
        self.down = nn.Parameter(torch.randn(4, 32, 16) / 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offsets = torch.tensor([3, 6, 9, 12], dtype=torch.int32)  # 3 tokens per expert, sorted
        hidden = torch._grouped_mm(x, self.up, offs=offsets).relu()
        return torch._grouped_mm(hidden, self.down, offs=offsets)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm is torch >= 2.8")
def test_float32_experts_in_one_grouped_matmul_are_measured_as_the_cpu_runs_them() -> None:
    # its fake kernel demands bfloat16, as the CUDA kernel does; the CPU kernel takes float32
    torch.manual_seed(0)
    model, tokens = Experts(), torch.randn(12, 16)
    # (the CPU kernel refuses the expanded gradient of a plain sum)
    fake = model_memory(model, tokens, loss=lambda out: out.square().sum())
    assert (
        fake.to_dict()
        == model_memory(model, tokens, loss=lambda out: out.square().sum(), engine="real").to_dict()
    )
    assert fake.saved_total_bytes > 0


def test_an_lstm_on_the_cpu_saves_a_workspace_fake_tensors_do_not_know() -> None:
    """oneDNN's LSTM kernel (the real CPU step) keeps a workspace for backward; on fake tensors
    the LSTM runs as its reference cells. The difference is in the saved bytes of the LSTM only,
    and the fake figure is the lower one (documented in docs/memory.md)."""
    model, inputs = _zoo("lstm_tagger")
    fake = model_memory(model, inputs, optimizer=None)
    expected, _ = _saved_in_a_real_forward(model, inputs)
    found = _per_module(fake)
    assert found["tag"] == expected["tag"]
    assert 0 < found["lstm"] < expected["lstm"]


def test_the_categories_add_up_to_the_peak_and_count_what_they_should() -> None:
    model, inputs = _zoo("resnetish")
    report = model_memory(model, inputs, optimizer="adamw")
    assert sum(report.by_category().values()) == report.peak_bytes
    params = [param for param in model.parameters()]
    param_bytes = sum(_bytes(param) for param in params)
    assert report.parameter_bytes == param_bytes
    assert report.buffer_bytes == sum(_bytes(buffer) for buffer in model.buffers())
    # AdamW: two moments per parameter and a float32 step counter each, alive all step long
    assert report.optimizer_bytes == 2 * param_bytes + 4 * len(params)
    sgd = model_memory(model, inputs, optimizer="sgd")
    assert sgd.optimizer_bytes == 0
    assert report.peak_bytes > sgd.peak_bytes


def test_eval_mode_keeps_nothing_for_backward() -> None:
    model, inputs = _zoo("unet")
    train = model_memory(model, inputs, optimizer=None)
    report = model_memory(model, inputs, mode="eval")
    assert (report.gradient_bytes, report.saved_bytes, report.optimizer_bytes) == (0, 0, 0)
    assert all(layer.saved_bytes == 0 for layer in report)
    assert report.peak_phase == "forward" and report.peak_bytes < train.peak_bytes


@pytest.mark.parametrize("name", ["resnetish", "transformer", "unet", "tied_lm"])
def test_the_peak_is_affine_in_the_batch(name: str) -> None:
    """Saved tensors scale with the batch exactly; the peak does too once activations decide
    it (at small batches it may fall in the optimizer step instead, where they are gone)."""
    model, (batch,) = _zoo(name)
    reports = [model_memory(model, batch.repeat(n, *[1] * (batch.dim() - 1))) for n in (8, 16, 24)]
    saved = [sum(layer.saved_bytes for layer in report) for report in reports]
    assert saved[2] - saved[1] == saved[1] - saved[0] > 0
    assert len({report.peak_phase for report in reports}) == 1
    peaks = [report.peak_bytes for report in reports]
    assert peaks[2] - peaks[1] == peaks[1] - peaks[0] > 0


def test_autocast_saves_half_precision_activations() -> None:
    torch.manual_seed(0)
    model, batch = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)), torch.randn(32, 64)
    full = model_memory(model, batch, optimizer=None)
    mixed = model_memory(model, batch, optimizer=None, autocast=torch.bfloat16)
    assert mixed.saved_bytes < full.saved_bytes
    assert mixed["1"].saved_bytes * 2 == full["1"].saved_bytes  # the ReLU's bf16 output
    assert "autocast bfloat16" in mixed.headline()
    assert (
        mixed.to_dict()
        == model_memory(model, batch, optimizer=None, autocast=torch.bfloat16, engine="real").to_dict()
    )


def test_dtype_casts_the_weights_and_the_input() -> None:
    model, batch = nn.Linear(64, 64), torch.randn(8, 64)
    assert model_memory(model, batch, dtype=torch.bfloat16).parameter_bytes == (64 * 64 + 64) * 2
    assert model.weight.dtype == torch.float32


def test_cuda_rounding_sizes_every_block_in_512_bytes() -> None:
    model, inputs = _zoo("mlp")
    exact = model_memory(model, inputs)
    cuda = model_memory(model, inputs, device="cuda")
    assert (exact.rounding, cuda.rounding) == (1, 512)
    assert cuda.peak_bytes > exact.peak_bytes
    assert all(value % 512 == 0 for value in cuda.by_category().values())
    assert "512-byte blocks" in str(cuda)


def test_a_model_on_the_meta_device_is_measured() -> None:
    with torch.device("meta"):
        model = zoo.Decoder(vocab=32000, dim=1024, layers=4, hidden=2816, heads=8)
    start = time.perf_counter()
    report = model_memory(model, input_size=(1, 512), autocast=torch.bfloat16)
    elapsed = time.perf_counter() - start
    assert report.parameter_bytes == sum(p.numel() * 4 for p in model.parameters())
    assert report.peak_bytes > 4 * report.parameter_bytes  # weights, gradients, two moments
    assert elapsed < 60  # a guard against a hang, not a benchmark (benchmarks/bench_memory.py)
    assert all(param.device.type == "meta" for param in model.parameters())


def test_the_text_is_deterministic_and_names_the_phase_and_layers() -> None:
    model, inputs = _zoo("resnetish")
    text = str(model_memory(model, inputs))
    torch.manual_seed(1)
    again, _ = _zoo("resnetish")
    assert str(model_memory(again, inputs)) == text
    assert "0x" not in text
    assert text.splitlines()[0].startswith("ResNetish training step, adamw, input 2x3x32x32 float32: peak ")
    assert "layer1.0.conv1" in text
    markdown = model_memory(model, inputs).to_markdown()
    assert "| `layer1.0.conv1` | Conv2d |" in markdown


def test_check_fails_over_budget_naming_the_phase_and_who_holds_it() -> None:
    model, inputs = _zoo("unet")
    report = model_memory(model, inputs, optimizer=None)
    report.check(max_peak=report.peak_bytes)
    with pytest.raises(HealthError, match=r"over the budget of 1\.0 KiB") as raised:
        report.check(max_peak="1KiB")
    message = str(raised.value)
    assert f"in {report.peak_phase}" in message and "saved by:" in message
    assert raised.value.findings[0].observed == report.peak_bytes


def test_max_batch_size_finds_the_largest_batch_that_fits() -> None:
    model = nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 10))

    def make(batch: int) -> torch.Tensor:
        return torch.randn(batch, 128)

    fit = max_batch_size(model, make, budget="4MiB")
    assert fit.peak_bytes == model_memory(model, make(fit.batch_size)).peak_bytes <= 4 * 2**20
    assert fit.next_peak_bytes == model_memory(model, make(fit.batch_size + 1)).peak_bytes > 4 * 2**20
    assert fit.traces < 30
    assert str(fit).startswith(f"batch {fit.batch_size} fits 4.0 MiB")
    nothing = max_batch_size(model, make, budget=1000)
    assert nothing.batch_size == 0 and "no batch fits" in str(nothing)
    capped = max_batch_size(model, make, budget="1GiB", limit=8)
    assert capped.batch_size == 8


def test_sizes_parse_and_print() -> None:
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("80 GB") == 80 * 10**9
    assert parse_bytes("1.5e9") == 1_500_000_000 and parse_bytes(512) == 512
    assert format_bytes(5 * 2**20) == "5.0 MiB"
    for bad in ("lots", "-1GB", "12 parsecs", True, None, float("inf")):
        with pytest.raises(ValueError, match="budget="):
            parse_bytes(bad)


def test_bad_arguments_name_themselves() -> None:
    model, batch = nn.Linear(4, 2), torch.randn(3, 4)
    with pytest.raises(ValueError, match="optimizer='adamx': expected one of 'sgd'"):
        model_memory(model, batch, optimizer="adamx")
    with pytest.raises(ValueError, match="mode must be 'train' or 'eval', got mode='test'"):
        model_memory(model, batch, mode="test")
    with pytest.raises(ValueError, match=r"give input= .* or input_size="):
        model_memory(model)
    with pytest.raises(ValueError, match="input_size=\\(0, 4\\)"):
        model_memory(model, input_size=(0, 4))
    with pytest.raises(TypeError, match=r"autocast must be a floating-point torch\.dtype, got str"):
        model_memory(model, batch, autocast="bf16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_peak='big'"):
        model_memory(model, batch).check(max_peak="big")
    with torch.device("meta"):
        on_meta = nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"engine='real'.*meta device"):
        model_memory(on_meta, input_size=(3, 4), engine="real")
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        model_memory("resnet", batch)  # type: ignore[arg-type]


def test_a_forward_fake_tensors_cannot_follow_names_the_layer_and_leaves_the_model() -> None:
    model, batch = zoo.build("data_dependent")
    with untouched(model), pytest.raises(LayerError, match="cannot run on fake tensors") as raised:
        model_memory(model, batch)
    assert raised.value.layer != "" or "DataDependent" in str(raised.value)
    real = model_memory(model, batch, engine="real")  # the way out: a real step on copies
    assert real.peak_bytes > 0


def test_optimizer_class_and_factory() -> None:
    model, batch = nn.Linear(64, 64), torch.randn(8, 64)
    by_class = model_memory(model, batch, optimizer=torch.optim.Adam)
    assert by_class.optimizer == "Adam" and by_class.optimizer_bytes == 2 * (64 * 64 + 64) * 4 + 2 * 4
    factory = model_memory(
        model, batch, optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9)
    )
    assert factory.optimizer_bytes == (64 * 64 + 64) * 4


def test_a_snapshot_of_a_report_diffs_layer_by_layer() -> None:
    from pytest_modelhooks.report.text import snapshot_text
    from pytest_modelhooks.snapshot import change_report

    model, _ = _zoo("resnetish")
    old = snapshot_text(model_memory(model, torch.randn(2, 3, 32, 32)))
    new = snapshot_text(model_memory(model, torch.randn(4, 3, 32, 32)))
    assert change_report(old, old) == []
    lines = change_report(old, new)
    conv = 2 * 16 * 32 * 32 * 4  # two more samples of the stem convolution's output
    assert lines[0].startswith("Changed layers (snapshot -> now): ")
    assert lines[1].startswith("  peak: ") and lines[1].endswith("MiB)")
    assert f"  ~ stem.0: saved +{format_bytes(conv)}" in lines


def test_a_broken_forward_is_named_at_its_layer_without_blaming_fake_tensors() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(9, 2))  # the second layer expects 9 features
    for engine in ("fake", "real"):
        with untouched(model), pytest.raises(LayerError, match=r"layer '1' \(Linear\) failed") as raised:
            model_memory(model, torch.randn(3, 4), engine=engine)
        assert raised.value.layer == "1" and "fake tensors" not in str(raised.value)
