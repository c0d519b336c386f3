"""What the dependency checks cost, as ratios to a plain no_grad forward of the same input.

    python benchmarks/bench_leaks.py [--repeats 3]

Models from benchmarks/models.py: the ResNet-50-sized CNN (batch 3, 224x224) for
``batch_leaks`` and ``check_deterministic``; GPT-2 small (transformers when installed, random
init; batch 3, 64 tokens) for ``causal_leaks`` (8 positions by default) and ``batch_leaks``.
Medians of the repeats, all in one process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import ResNet50, gpt2_small

from pytest_modelhooks import batch_leaks, causal_leaks, check_deterministic


def median_ms(run: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    repeats = parser.parse_args().repeats
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, medians of {repeats}")

    cnn = ResNet50().eval()
    images = torch.randn(3, 3, 224, 224)

    def forward_cnn() -> None:
        with torch.no_grad():
            cnn(images)

    plain = median_ms(forward_cnn, repeats)
    print(f"ResNet-50-sized CNN, 3x3x224x224: forward {plain:.0f} ms")
    for name, run in [
        ("batch_leaks", lambda: batch_leaks(cnn, images)),
        ("check_deterministic", lambda: check_deterministic(cnn, images)),
    ]:
        took = median_ms(run, repeats)
        print(f"  {name:<22} {took:7.0f} ms  {took / plain:5.1f}x")

    lm, kind = gpt2_small()
    tokens = torch.randint(0, 50257, (3, 64), generator=torch.Generator().manual_seed(0))
    logits = "logits" if kind == "transformers" else None

    def forward_lm() -> None:
        with torch.no_grad():
            lm(tokens)

    plain = median_ms(forward_lm, repeats)
    print(f"GPT-2 small ({kind}), 3x64 tokens: forward {plain:.0f} ms")
    for name, run in [
        ("causal_leaks (8 pos.)", lambda: causal_leaks(lm, tokens, output=logits)),
        ("batch_leaks", lambda: batch_leaks(lm, tokens, output=logits)),
    ]:
        took = median_ms(run, repeats)
        print(f"  {name:<22} {took:7.0f} ms  {took / plain:5.1f}x")


if __name__ == "__main__":
    main()
