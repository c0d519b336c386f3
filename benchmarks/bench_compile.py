"""What the compile and export checks cost: seconds per check on the test zoo and the benchmark
models, beside a plain eager forward of the same input.

    python benchmarks/bench_compile.py

``graph_breaks``: dynamo's tracer on the model (eagerly and compiled), a cold compile;
``recompiles``: the batch marked dynamic, called at two batch sizes (backend "eager");
``export``: ``export_problems`` with a dynamic batch (torch.export, then the program and eager
compared at the batch given and at twice it); ``onnx``: the same through the ONNX exporter and
onnxruntime (when the onnx extra is installed). Every check resets dynamo's caches before and
after. All in one process; the first ONNX export includes importing onnxscript.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import ResNet50, gpt2_small

from pytest_modelhooks.compile import export_problems, graph_breaks, recompiles
from tests import zoo


def main() -> None:
    print(
        f"# {datetime.date.today()}  torch {torch.__version__}  "
        f"{platform.processor() or platform.machine()}  {os.cpu_count()} cores"
    )
    print("# python benchmarks/bench_compile.py")
    cases: list[tuple[str, Any, Any, dict[str, Any]]] = [
        (name, *zoo.build(name), {}) for name in ("mlp", "resnetish", "unet", "transformer", "tied_lm", "gru")
    ]
    torch.manual_seed(0)
    cases.append(("ResNet-50-sized, 2x3x224x224", ResNet50().eval(), torch.randn(2, 3, 224, 224), {}))
    # without its key-value cache: transformers' cache object is no output torch.export can flatten
    tokens = torch.randint(0, 50257, (2, 64))
    cases.append(("GPT-2 small, 2x64 tokens", gpt2_small()[0], tokens, {"use_cache": False}))
    onnx = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime"))
    print(
        f"{'model':32} {'breaks':>7} {'breaks s':>8} {'recompile s':>11} {'export s':>8} "
        f"{'onnx s':>7} {'problems':>8} {'forward ms':>10}"
    )
    for name, model, batch, kwargs in cases:
        model.eval()  # exported for inference (an ONNX model in training mode is itself a finding)
        inputs = batch if isinstance(batch, tuple) else (batch,)
        # a batch of two at least: torch.export keeps a batch of 1 static
        inputs = tuple(t.repeat(2, *[1] * (t.dim() - 1)) if t.shape[0] < 2 else t for t in inputs)
        start = time.perf_counter()
        found = graph_breaks(model, *inputs, **kwargs)
        check = time.perf_counter() - start
        smaller = tuple(t[:1].repeat(3, *[1] * (t.dim() - 1)) for t in inputs)
        start = time.perf_counter()
        recompiles(model, inputs, smaller, dynamic="batch", **kwargs)
        again = time.perf_counter() - start
        start = time.perf_counter()
        problems = export_problems(model, *inputs, dynamic_shapes="batch", **kwargs)
        export = time.perf_counter() - start
        onnx_seconds = "-"
        if onnx:
            start = time.perf_counter()
            problems += export_problems(model, *inputs, dynamic_shapes="batch", to="onnx", **kwargs)
            onnx_seconds = f"{time.perf_counter() - start:.2f}"
        with torch.no_grad():
            model(*inputs, **kwargs)
            start = time.perf_counter()
            model(*inputs, **kwargs)
            forward = time.perf_counter() - start
        skipped = any(finding.statistic == "not compiled" for finding in found)
        breaks = "skipped" if skipped else str(sum(int(finding.observed) for finding in found))
        print(
            f"{name:32} {breaks:>7} {check:>8.2f} {again:>11.2f} {export:>8.2f} {onnx_seconds:>7} "
            f"{len(problems):>8} {forward * 1000:>10.1f}"
        )


if __name__ == "__main__":
    main()
