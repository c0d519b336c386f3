"""ActivationStats overhead vs a plain forward (or training step) and vs fastai-style hooks.

    python benchmarks/bench_stats.py [--device cpu|cuda] [--batch 8] [--step] [--repeats 5]
    python benchmarks/bench_stats.py --memory   # what a long run of recorded batches holds
    python benchmarks/bench_stats.py --count-launches [--json FILE]   # the GPU cost, on the CPU

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


class _Ops(TorchDispatchMode):  # type: ignore[misc]
    """Counts the aten ops dispatched: on a GPU each is a kernel launch (~10-20 us on a training
    step that launches are the bound of)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_launches(json_path: Path | None) -> None:
    """Per model: the aten ops ActivationStats (default statistics) dispatches per batch on its
    device path, forced on the CPU (a GPU's path: no host read), and the time per hooked module
    at a batch of one; on the CPU the reductions' kernels run on the host too, so that figure
    bounds the host time from above. One JSON line each."""
    import pytest_modelhooks.stats.activations as activations

    activations.on_host = lambda x: False  # the device path, as on a GPU
    cases = [
        ("ResNet-50-sized", ResNet50(), torch.randn(1, 3, 64, 64)),
        ("ViT-B/16-sized", ViTB16(image=64), torch.randn(1, 3, 64, 64)),
        ("ViT-B/16-sized, 4x deeper", ViTB16(image=64, layers=48), torch.randn(1, 3, 64, 64)),
    ]
    lines = []
    for name, model, batch in cases:
        model.eval()
        with torch.no_grad():
            plain_ops = _Ops()
            with plain_ops:
                model(batch)
            stats = ActivationStats(model)
            with stats:
                model(batch)  # warm
                counted = _Ops()
                with counted:
                    model(batch)
                timed = []
                for _ in range(5):
                    start = time.perf_counter()
                    model(batch)
                    timed.append(time.perf_counter() - start)
            plain = []
            for _ in range(5):
                start = time.perf_counter()
                model(batch)
                plain.append(time.perf_counter() - start)
        modules = len(stats.series_names)
        extra = statistics.median(timed) - statistics.median(plain)
        line = {
            "model": name,
            "hooked_modules": modules,
            "launches_per_batch": counted.count - plain_ops.count,
            "launches_per_module": round((counted.count - plain_ops.count) / modules, 2),
            "host_us_per_module": round(extra / modules * 1e6, 1),
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
    parser.add_argument("--step", action="store_true", help="time a training step instead of a forward")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--profile", action="store_true", help="print torch.profiler's top ops for one recorded run"
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
    model = ResNet50().to(device)
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
        "ActivationStats (mean, std, near-zero, non-finite)": ours_target,
        "ActivationStats (default, fused=True)": ours_fused,
        "ActivationStats (every module)": ours_full,
        "ActivationStats (mean and std only)": ours_lean,
        "fastai-style hook (.item() per module)": fastai,
    }
    if args.step:
        contenders["ActivationStats + GradientStats"] = ours_grads
        contenders["ActivationStats + GradientStats (fused=True)"] = ours_grads_fused
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
    print(
        f"ResNet-50-sized CNN, batch {args.batch}, 224x224, {what} on {device_name}, "
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
        args.json.write_text(json.dumps({"medians_s": medians, "times_s": times}, indent=2))


if __name__ == "__main__":
    main()
