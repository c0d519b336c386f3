"""The whole benchmark suite in one command: one table, one JSON file.

    python benchmarks/run.py [--repeats 5] [--json benchmarks/results/run.json] [--quick]

Every figure is a ratio measured in one process (or, for the plugin's load cost, in one
interleaved series of processes), with the median and the spread over repeats:

* model_summary vs a plain forward vs torchinfo.summary, and model_sizes (meta vs real), on a
  ResNet-50-sized CNN, a ViT-B/16-sized encoder, GPT-2 small, a 10,000-layer MLP and a 7B
  LLaMA-style decoder built on meta (bench_summary.py, one subprocess per model: peak RSS);
* model_summary time against the number of modules (100 to 10,000 layers): is it linear?
* ActivationStats vs a plain forward and vs a fastai-style reference (bench_stats.py);
* the plugin's load cost: ``pytest --collect-only`` on a small file with and without
  ``-p no:modelhooks``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def summaries(repeats: int, quick: bool) -> list[dict[str, Any]]:
    from bench_summary import MODELS

    results = []
    for name in MODELS if not quick else ["resnet50", "llama7b_meta"]:
        out = subprocess.run(
            [sys.executable, str(HERE / "bench_summary.py"), "--one", name, "--repeats", str(repeats)],
            check=True,
            capture_output=True,
            text=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  measured {name}", file=sys.stderr)
    return results


def linearity(repeats: int) -> list[dict[str, float]]:
    import torch
    from models import deep_mlp

    from pytest_modelhooks import model_summary

    rows = []
    for layers in (50, 500, 5000):
        model = deep_mlp(layers).eval()
        batch = torch.randn(1, 16)
        model_summary(model, input_data=batch)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model_summary(model, input_data=batch)
            times.append(time.perf_counter() - start)
        modules = len(list(model.modules()))
        rows.append(
            {
                "modules": modules,
                "median_s": statistics.median(times),
                "us_per_module": statistics.median(times) / modules * 1e6,
            }
        )
    return rows


def stats(repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "stats.json"
        subprocess.run(
            [sys.executable, str(HERE / "bench_stats.py"), "--repeats", str(repeats), "--json", str(target)],
            check=True,
            capture_output=True,
            text=True,
        )
        data: dict[str, Any] = json.loads(target.read_text())
    return data


def plugin_load(repeats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "test_small.py").write_text("def test_one():\n    assert True\n")
        base = [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "test_small.py",
        ]
        times: dict[str, list[float]] = {"with": [], "without": []}
        for _ in range(repeats * 2):
            for key, extra in (("with", []), ("without", ["-p", "no:modelhooks"])):
                start = time.perf_counter()
                subprocess.run([*base, *extra], cwd=folder, check=True, capture_output=True)
                times[key].append(time.perf_counter() - start)
    medians = {key: statistics.median(values) for key, values in times.items()}
    return {
        "with_s": medians["with"],
        "without_s": medians["without"],
        "cost_ms": (medians["with"] - medians["without"]) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "run.json")
    parser.add_argument("--quick", action="store_true", help="two models, fewer repeats: a smoke run")
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats
    print("measuring summaries...", file=sys.stderr)
    summary_rows = summaries(repeats, args.quick)
    print("measuring linearity, stats, plugin load...", file=sys.stderr)
    linear_rows = linearity(repeats)
    stats_result = stats(repeats)
    load = plugin_load(repeats)
    memory = subprocess.run(
        [sys.executable, str(HERE / "bench_summary.py"), "--meta-memory"],
        check=True,
        capture_output=True,
        text=True,
    )
    meta = json.loads(memory.stdout.strip().splitlines()[-1])

    from bench_summary import report

    lines = [report(summary_rows)]
    lines.append(
        f"7B meta summary, first call in a fresh process: {meta['seconds']:.2f} s, "
        f"{meta['rss_above_baseline_mb']:.0f} MB more resident than the interpreter with torch imported"
    )
    lines.append("")
    lines.append(
        "model_summary vs modules (deep MLP): "
        + ", ".join(f"{r['modules']:,}: {r['us_per_module']:.0f} us/module" for r in linear_rows)
    )
    base = stats_result["medians_s"]["plain"]
    lines.append(
        "ActivationStats, ResNet-50-sized CNN batch 8 CPU forward: "
        + ", ".join(
            f"{name} {value / base:.2f}x"
            for name, value in stats_result["medians_s"].items()
            if name != "plain"
        )
    )
    lines.append(
        f"plugin load cost (pytest --collect-only, with minus without the plugin): {load['cost_ms']:.0f} ms"
    )
    print("\n".join(lines))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "meta_7b": meta,
                "summaries": summary_rows,
                "linearity": linear_rows,
                "stats": stats_result,
                "plugin_load": load,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
