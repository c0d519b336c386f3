"""What ``graph_breaks`` costs: seconds per check on the test zoo and the benchmark models, beside
a plain eager forward of the same input.

    python benchmarks/bench_compile.py

Each check runs dynamo's tracer on the model (eagerly and compiled) and resets dynamo's caches
before and after, so every figure is a cold compile. All in one process.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import ResNet50, gpt2_small

from pytest_modelhooks.compile import graph_breaks
from tests import zoo


def main() -> None:
    print(
        f"# {datetime.date.today()}  torch {torch.__version__}  "
        f"{platform.processor() or platform.machine()}  {os.cpu_count()} cores"
    )
    print("# python benchmarks/bench_compile.py")
    cases = [
        (name, *zoo.build(name)) for name in ("mlp", "resnetish", "unet", "transformer", "tied_lm", "gru")
    ]
    torch.manual_seed(0)
    cases.append(("ResNet-50-sized, 1x3x224x224", ResNet50().eval(), torch.randn(1, 3, 224, 224)))
    cases.append(("GPT-2 small, 1x64 tokens", gpt2_small()[0], torch.randint(0, 50257, (1, 64))))
    print(f"{'model':32} {'breaks':>7} {'check s':>8} {'forward ms':>10}")
    for name, model, batch in cases:
        inputs = batch if isinstance(batch, tuple) else (batch,)
        start = time.perf_counter()
        found = graph_breaks(model, *inputs)
        check = time.perf_counter() - start
        with torch.no_grad():
            model(*inputs)
            start = time.perf_counter()
            model(*inputs)
            forward = time.perf_counter() - start
        skipped = any(finding.statistic == "not compiled" for finding in found)
        breaks = "skipped" if skipped else str(sum(int(finding.observed) for finding in found))
        print(f"{name:32} {breaks:>7} {check:>8.2f} {forward * 1000:>10.1f}")


if __name__ == "__main__":
    main()
