"""ActivationStats overhead vs a plain forward (or training step) and vs fastai-style hooks.

    python benchmarks/bench_stats.py [--device cpu|cuda] [--model resnet50|vit] [--batch 8] [--step]
                                     [--repeats 5] [--core]
    python benchmarks/bench_stats.py --memory   # what a long run of recorded batches holds
    python benchmarks/bench_stats.py --count-launches [--json FILE]   # the GPU cost, on the CPU
    python benchmarks/bench_stats.py --pieces   # the CPU path in cache-sized pieces vs whole passes

All contenders run in one process, interleaved round by round; the figures are ratios of
medians. "fastai-style" is a reference implementation of fastai's default hook: per module,
mean, std and near-zero fraction, each read back with ``.item()``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import ResNet50, ViTB16

from pytest_modelhooks import ActivationStats, GradientStats
from pytest_modelhooks._torch import TorchDispatchMode


def fastai_style(model: torch.nn.Module) -> list[Any]:
    modules = [
        module for module in model.modules() if next(module.parameters(recurse=False), None) is not None
    ]
    records: list[tuple[float, float, float]] = []

    def hook(module: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
        out = out.detach()
        records.append((out.mean().item(), out.std().item(), (out <= 0.05).long().sum().item() / out.numel()))

    return [module.register_forward_hook(hook) for module in modules]


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:  # Linux
        return int(statm.read().split()[1]) * 4096


def memory_per_record(batches: int = 20_000, layers: int = 50) -> None:
    """Resident memory per series and recorded batch over a long run (a training loop that
    records every batch): tiny layers, so the records, not the forward, dominate."""
    import gc

    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU()) for _ in range(layers)]
    model = torch.nn.Sequential(*blocks)
    batch = torch.randn(4, 16)
    with ActivationStats(model) as stats:
        for _ in range(100):  # allocator and caches warm
            model(batch)
        gc.collect()
        before = _resident_bytes()
        for _ in range(batches):
            model(batch)
        gc.collect()
        grown = _resident_bytes() - before
    series = len(stats.series_names)
    print(
        f"ActivationStats records, {series} series x {batches:,} batches (CPU): "
        f"{grown / (series * batches):.0f} bytes per series and batch resident"
    )
    steps = batches // 4  # each a backward too
    with GradientStats(model) as grads:
        for _ in range(50):
            model(batch).sum().backward()
        gc.collect()
        before = _resident_bytes()
        for _ in range(steps):
            model(batch).sum().backward()
        gc.collect()
        grown = _resident_bytes() - before
    print(
        f"GradientStats records, {len(grads)} parameters x {steps:,} steps (CPU): "
        f"{grown / (len(grads) * steps):.0f} bytes per parameter and step resident"
    )


# ops that launch no kernel: views, and allocations without a fill
_NO_KERNEL = {"detach", "empty", "empty_strided", "empty_like", "lift_fresh", "alias"}


def _tensor_bytes(tree: Any) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(item) for item in tree)
    return 0


class _Ops(TorchDispatchMode):  # type: ignore[misc]
    """Counts the aten ops dispatched that launch a kernel (on a GPU each costs ~5-20 us on a
    training step bound by launches; views and bare allocations are not counted) and the bytes
    they read and write (their tensor arguments and results: what a kernel bound by memory
    bandwidth pays for)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if not func.is_view and func.__name__.split(".")[0] not in _NO_KERNEL:
            self.count += 1
            read = [value for key, value in kwargs.items() if key != "out"]
            self.bytes += _tensor_bytes(args) + _tensor_bytes(read) + _tensor_bytes(result)
        return result


def _host_time(
    model: torch.nn.Module, batch: torch.Tensor, repeats: int = 100, **options: Any
) -> tuple[float, float]:
    """Seconds of host work the recorder adds per batch on the device path, (in its hooks, at
    the batch's end): both replayed on stand-ins, one tiny tensor per distinct output shape (the
    same groups, the same ops and Python, almost no arithmetic). A GPU run pays the first on
    its host as measured; the second is mostly the dispatch of the batch's kernels, whose cost
    per op on a GPU differs from a CPU's."""
    from pytest_modelhooks.stats.dead import RECTIFIERS

    recorder = ActivationStats(model, **options)
    events: list[tuple[str, torch.nn.Module, Any, Any]] = []
    handles = [
        module.register_forward_hook(lambda m, a, o: events.append(("hook", m, a, o)))
        for module in recorder.modules
    ]
    handles += [
        module.register_forward_pre_hook(lambda m, a: events.append(("pre", m, a, None)))
        for module in model.modules()
        if isinstance(module, RECTIFIERS)
    ]
    with torch.no_grad():
        output = model(batch)
    for handle in handles:
        handle.remove()
    shapes: dict[tuple[int, ...], torch.Tensor] = {}
    stand_in: dict[int, torch.Tensor] = {}

    def small(tensor: Any) -> Any:
        if not isinstance(tensor, torch.Tensor):
            return tensor
        if id(tensor) not in stand_in:
            key = tuple(tensor.shape)
            if key not in shapes:  # a shape of its own: as many dims, the last one distinct
                rank = tensor.dim()
                # (two values at least: one value per row takes another path in var_mean)
                shapes[key] = torch.randn((1,) * (rank - 1) + (len(shapes) + 2,)) if rank else torch.randn(())
            stand_in[id(tensor)] = shapes[key].clone()
        return stand_in[id(tensor)]

    replay = [(kind, module, tuple(small(a) for a in args), small(out)) for kind, module, args, out in events]
    final = small(output)
    hooks, ends = [], []
    with torch.no_grad(), recorder:
        assert recorder.hooks is not None
        # what torch calls: each module's Hook.hook_fn, which calls recorder.hook
        called = {id(hook.module): hook.hook_fn for hook in recorder.hooks.hooks}
        for round_ in range(repeats + 1):  # (the first replay learns which outputs keep their values)
            start = time.perf_counter()
            recorder._begin_batch(model, ())
            for kind, module, args, out in replay:
                if kind == "hook":
                    called[id(module)](module, args, out)
                else:
                    recorder._rectifier_input(module, args)
            middle = time.perf_counter()
            recorder._end_batch(model, (), final)
            recorder._stop_seeing_rectifiers(model, (), final)
            if round_:
                hooks.append(middle - start)
                ends.append(time.perf_counter() - middle)
    return statistics.median(hooks), statistics.median(ends)


def _launches(model: torch.nn.Module, batch: torch.Tensor, step: bool, **options: Any) -> dict[str, int]:
    """What the statistics add to one recorded batch (or training step): the kernels, the bytes
    those kernels read and write, and as a yardstick the bytes of the hooked modules' outputs
    (or of the gradients) - the data one pass over everything reduced reads."""

    def run() -> None:
        if step:
            model.zero_grad(set_to_none=True)  # (no kernel; each backward writes fresh gradients)
            model(batch).float().square().mean().backward()
        else:
            with torch.no_grad():
                model(batch)

    # the baseline with no-op hooks on the same modules: a hooked module may take another path
    # (a TransformerEncoderLayer's fused inference path runs only without hooks on its parts)
    from pytest_modelhooks._tree import tensor_leaves
    from pytest_modelhooks.hooks.select import select_modules

    outputs = [0]

    def measure(module: torch.nn.Module, args: Any, output: Any) -> None:
        leaves = [tensor for _, tensor in tensor_leaves(output) if tensor.is_floating_point()]
        outputs[0] += sum(_tensor_bytes(tensor) for tensor in leaves)

    handles = [module.register_forward_hook(measure) for _, module in select_modules(model, None)]
    plain = _Ops()
    with plain:
        run()
    for handle in handles:
        handle.remove()
    if step:
        stats = GradientStats(model, **options)
        with stats:
            run()  # (a first step: nothing learned is needed)
            counted = _Ops()
            with counted:
                run()
        reduced = sum(_tensor_bytes(param) for param in model.parameters() if param.requires_grad)
        count = len(stats.params)
    else:
        recorder = ActivationStats(model, **options)
        with recorder:
            run()  # the first batch learns which outputs keep their values
            counted = _Ops()
            with counted:
                run()
        reduced, count = outputs[0], len(recorder.series_names)
    return {
        "count": count,
        "launches": counted.count - plain.count,
        "bytes": counted.bytes - plain.bytes,
        "reduced_bytes": reduced,
    }


def _op_us(calls: int = 10_000, repeats: int = 5) -> float:
    """Microseconds of host time one tiny torch op costs here (``torch.add`` of two 2-element
    tensors, nearly all of it dispatch): the yardstick that makes the host time per module
    comparable across machines, as a count of such ops."""
    x, y = torch.randn(2), torch.randn(2)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            torch.add(x, y)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times) * 1e6


def count_launches(json_path: Path | None) -> None:
    """Per model: the kernels ActivationStats (default statistics) adds to a batch on its
    device path, forced on the CPU (a GPU's path: no host read), with outputs held to the
    batch's end (the default) and reduced in each hook (``max_held=0``); the same for
    GradientStats on a training step; and the host time each adds per hooked module (or
    parameter) on inputs so small that the kernels cost almost nothing on the CPU either: the
    Python and dispatch a GPU run pays. One JSON line each."""
    import pytest_modelhooks.stats.activations as activations
    import pytest_modelhooks.stats.gradients as gradients
    import pytest_modelhooks.stats.host as host
    import pytest_modelhooks.stats.reduce as reduce

    activations.on_host = lambda x: False  # the device path, as on a GPU
    gradients.on_host = lambda grad: False
    cases = [
        ("ResNet-50-sized", lambda: ResNet50(), (3, 64, 64), (3, 32, 32)),
        # (a ViT takes one image size: at 64x64, 17 tokens, its activations are already small)
        ("ViT-B/16-sized", lambda: ViTB16(image=64), (3, 64, 64), (3, 64, 64)),
        ("ViT-B/16-sized, 4x deeper", lambda: ViTB16(image=64, layers=48), (3, 64, 64), (3, 64, 64)),
    ]
    lines = []
    for name, build, size, tiny_size in cases:
        torch.manual_seed(0)
        model = build().eval()
        batch, tiny = torch.randn(1, *size), torch.randn(1, *tiny_size)
        held = _launches(model, batch, False)
        per_module = _launches(model, batch, False, max_held=0)
        grads = _launches(model, batch, True)
        gradients.on_host, gradients.grad_on_host = lambda grad: True, reduce.grad_on_device
        grads_per_parameter = _launches(model, batch, True)  # each gradient in its own hook
        gradients.on_host, gradients.grad_on_host = lambda grad: False, host.grad_on_host
        model.zero_grad(set_to_none=True)
        modules = held["count"]

        host_times = {
            label: _host_time(model, tiny, **options)
            for label, options in (("held", {}), ("per_module", {"max_held": 0}))
        }
        op_us = _op_us()
        line = {
            "model": name,
            "hooked_modules": modules,
            "launches_per_batch": held["launches"],
            "launches_per_module": round(held["launches"] / modules, 2),
            "launches_per_batch_in_hooks": per_module["launches"],
            # bytes the kernels move, in passes over the hooked outputs (a GPU bound by memory
            # bandwidth pays for these; a pass at batch 32 is 4x a pass at the batch here)
            "passes_over_outputs": round(held["bytes"] / held["reduced_bytes"], 2),
            "passes_over_outputs_in_hooks": round(per_module["bytes"] / per_module["reduced_bytes"], 2),
            "host_us_per_module": round(host_times["held"][0] / modules * 1e6, 1),
            # the same in tiny torch ops: the machine's speed divided out
            "op_us": round(op_us, 2),
            "host_ops_per_module": round(host_times["held"][0] / modules * 1e6 / op_us, 2),
            "batch_end_us": round(host_times["held"][1] * 1e6),
            "host_us_per_module_in_hooks": round(sum(host_times["per_module"]) / modules * 1e6, 1),
            "parameters": grads["count"],
            "gradient_launches_per_step": grads["launches"],
            "gradient_launches_per_step_in_hooks": grads_per_parameter["launches"],
            "gradient_passes": round(grads["bytes"] / grads["reduced_bytes"], 2),
            "gradient_passes_in_hooks": round(
                grads_per_parameter["bytes"] / grads_per_parameter["reduced_bytes"], 2
            ),
        }
        lines.append(line)
        print(json.dumps(line))
    if json_path is not None:
        json_path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--model", choices=("resnet50", "vit"), default="resnet50")
    parser.add_argument(
        "--core",
        action="store_true",
        help="only plain, the default statistics (held and in hooks), mean/std and GradientStats",
    )
    parser.add_argument(
        "--with-fused", action="store_true", help="with --core: the default with fused=True too"
    )
    parser.add_argument("--step", action="store_true", help="time a training step instead of a forward")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--profile", action="store_true", help="print torch.profiler's top ops for one recorded run"
    )
    parser.add_argument(
        "--pieces",
        action="store_true",
        help="only plain and the default statistics, reduced in cache-sized pieces and in whole passes",
    )
    parser.add_argument("--memory", action="store_true", help="measure what recorded batches hold, then exit")
    parser.add_argument(
        "--count-launches",
        action="store_true",
        help="count the ops the statistics dispatch per batch on the device path (forced on the CPU)",
    )
    args = parser.parse_args()
    if args.memory:
        memory_per_record()
        return
    if args.count_launches:
        count_launches(args.json)
        return
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = (ResNet50() if args.model == "resnet50" else ViTB16()).to(device)
    batch = torch.randn(args.batch, 3, 224, 224, device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_once() -> None:
        if args.step:
            model.train()
            model(batch).float().pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.eval()
            with torch.no_grad():
                model(batch)

    def plain() -> None:
        run_once()

    def ours() -> None:
        with ActivationStats(model) as stats:
            run_once()
        stats.stats  # noqa: B018 - the one transfer to the host is part of the cost

    def ours_in_hooks() -> None:
        with ActivationStats(model, max_held=0) as stats:
            run_once()
        stats.stats  # noqa: B018

    def grads_only() -> None:
        with GradientStats(model) as grads:
            run_once()
        grads.unused()

    def ours_lean() -> None:
        with ActivationStats(model, statistics=("mean", "std"), track_dead=False) as stats:
            run_once()
        stats.stats  # noqa: B018

    def ours_target() -> None:
        with ActivationStats(
            model, statistics=("mean", "std", "near_zero", "nonfinite"), track_dead=False
        ) as stats:
            run_once()
        stats.stats  # noqa: B018

    def ours_fused() -> None:
        with ActivationStats(model, fused=True) as stats:
            run_once()
        stats.stats  # noqa: B018

    def ours_full() -> None:
        with ActivationStats(model, modules="all") as stats:
            run_once()
        stats.stats  # noqa: B018

    def ours_grads() -> None:
        with ActivationStats(model) as stats, GradientStats(model) as grads:
            run_once()
        stats.stats  # noqa: B018
        grads.unused()

    def ours_grads_fused() -> None:
        with ActivationStats(model, fused=True) as stats, GradientStats(model, fused=True) as grads:
            run_once()
        stats.stats  # noqa: B018
        grads.unused()

    def ours_whole_passes() -> None:
        import pytest_modelhooks.stats.host as host

        piece_size = host._piece_size
        host._piece_size = lambda: 1 << 62  # no tensor is large enough for pieces
        try:
            ours()
        finally:
            host._piece_size = piece_size

    def fastai() -> None:
        handles = fastai_style(model)
        try:
            run_once()
        finally:
            for handle in handles:
                handle.remove()

    contenders: dict[str, Callable[[], None]] = {
        "plain": plain,
        "ActivationStats (modules owning parameters)": ours,
        "ActivationStats (default, reduced in each hook)": ours_in_hooks,
        "ActivationStats (mean, std, near-zero, non-finite)": ours_target,
        "ActivationStats (default, fused=True)": ours_fused,
        "ActivationStats (every module)": ours_full,
        "ActivationStats (mean and std only)": ours_lean,
        "fastai-style hook (.item() per module)": fastai,
    }
    if args.step:
        contenders["GradientStats"] = grads_only
        contenders["ActivationStats + GradientStats"] = ours_grads
        contenders["ActivationStats + GradientStats (fused=True)"] = ours_grads_fused
    if args.core:
        core = ("plain", "ActivationStats (modules owning parameters)", "ActivationStats (mean and std only)")
        core += (
            "ActivationStats (default, reduced in each hook)",
            "GradientStats",
            "ActivationStats + GradientStats",
        )
        if args.with_fused:
            core += ("ActivationStats (default, fused=True)",)
        contenders = {name: func for name, func in contenders.items() if name in core}
    if args.pieces:
        contenders = {
            "plain": plain,
            "ActivationStats (default, in pieces)": ours,
            "ActivationStats (default, in whole passes)": ours_whole_passes,
        }
    for func in contenders.values():  # warm-up (and fused=True's one-time compile)
        func()
    sync()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, func in contenders.items():
            sync()
            start = time.perf_counter()
            func()
            sync()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    what = "training step" if args.step else "forward (no_grad)"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    described = "ResNet-50-sized CNN" if args.model == "resnet50" else "ViT-B/16-sized encoder"
    print(
        f"{described}, batch {args.batch}, 224x224, {what} on {device_name}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    base = medians["plain"]
    for name, value in medians.items():
        spread = f"{min(times[name]) * 1000:.0f}-{max(times[name]) * 1000:.0f}"
        print(f"  {name:<52} {value * 1000:8.1f} ms  ({spread})  {value / base:5.2f}x")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            ours()
            sync()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=40))
    if args.json:
        setup = {"model": args.model, "batch": args.batch, "step": args.step, "device": device_name}
        setup["torch"] = torch.__version__
        ratios = {name: value / base for name, value in medians.items()}
        args.json.write_text(
            json.dumps({**setup, "ratios": ratios, "medians_s": medians, "times_s": times}, indent=2)
        )


if __name__ == "__main__":
    main()
