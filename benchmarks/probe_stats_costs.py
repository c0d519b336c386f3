"""Where does ActivationStats' time go? Adds one reduction at a time to hooks on every module
that owns parameters and times a no_grad forward (ratios of medians, one process), then
profiles one recorded forward with cProfile.

    python benchmarks/probe_stats_costs.py [--device cuda] [--batch 32]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import ResNet50

from pytest_modelhooks import ActivationStats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    device = torch.device(args.device)
    model = ResNet50().to(device).eval()
    batch = torch.randn(args.batch, 3, 224, 224, device=device)
    modules = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]
    sink: list[Any] = []

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    steps: dict[str, Callable[[torch.Tensor], Any]] = {
        "no-op hook": lambda x: None,
        "sum": lambda x: x.sum(),
        "var_mean": lambda x: torch.var_mean(x),
        "aminmax": lambda x: torch.aminmax(x),
        "finite count_nonzero": lambda x: torch.count_nonzero(torch.isfinite(x)),
        "finite sum": lambda x: torch.isfinite(x).sum(),
        "finite sum int32": lambda x: torch.isfinite(x).sum(dtype=torch.int32),
        "finite float sum": lambda x: torch.isfinite(x).float().sum(),
        "nonfinite via x-x": lambda x: torch.count_nonzero(x - x),
        "finite all()": lambda x: torch.isfinite(x).all(),
        "near-zero count_nonzero": lambda x: torch.count_nonzero(x.abs() <= 0.05),
        "near-zero sum": lambda x: (x.abs() <= 0.05).sum(),
        "near-zero sum int32": lambda x: (x.abs() <= 0.05).sum(dtype=torch.int32),
        "near-zero histc": lambda x: torch.histc(x, 1, -0.05, 0.05),
        "channel amax": lambda x: x.amax(dim=[0, 2, 3] if x.dim() == 4 else [0]),
        "stack 6 scalars": lambda x: torch.stack([x.sum()] * 6),
    }

    def forward() -> None:
        with torch.no_grad():
            model(batch)

    def timed(hook: Callable[..., Any] | None) -> float:
        handles = [m.register_forward_hook(hook) for m in modules] if hook else []
        try:
            times = []
            for _ in range(args.repeats):
                sink.clear()
                sync()
                start = time.perf_counter()
                forward()
                sync()
                times.append(time.perf_counter() - start)
            return statistics.median(times)
        finally:
            for handle in handles:
                handle.remove()

    forward()
    base = timed(None)
    print(
        f"plain forward: {base * 1000:.1f} ms ({len(modules)} hooked modules, batch {args.batch}, {device})"
    )
    for name, op in steps.items():
        cost = timed(lambda m, a, out, op=op: sink.append(op(out.detach())))
        print(f"  {name:<24} {cost / base:5.2f}x  ({(cost - base) / len(modules) * 1e6:6.1f} us per module)")

    def recorded() -> None:
        with ActivationStats(model) as stats:
            forward()
        stats.stats  # noqa: B018

    recorded()
    times = []
    for _ in range(args.repeats):
        sync()
        start = time.perf_counter()
        recorded()
        sync()
        times.append(time.perf_counter() - start)
    print(f"  {'ActivationStats':<20} {statistics.median(times) / base:5.2f}x")
    profiler = cProfile.Profile()
    profiler.enable()
    recorded()
    sync()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(8)
    print(out.getvalue())


if __name__ == "__main__":
    main()
