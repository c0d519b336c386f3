"""model_summary / model_sizes cost vs a plain forward and vs torchinfo, measured in one run.

    python benchmarks/bench_summary.py [--repeats 5] [--json out.json]

Each model runs in its own subprocess (so peak RSS is per model), and inside it every contender
is timed in interleaved rounds, so machine noise hits them alike; the figures printed are
ratios of medians from the same process. torchinfo and transformers are used when installed
(with transformers, a Mixtral-8x7B built on meta joins the models; a peer that fails on a
model is reported as failing, not timed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODELS = ["resnet50", "vit_b16", "gpt2", "mlp10k", "llama7b_meta"]
if importlib.util.find_spec("transformers") is not None:
    MODELS.append("mixtral8x7b_meta")  # a mixture of experts: transformers' own implementation


def build(name: str) -> tuple[torch.nn.Module, Any, str]:
    import models

    torch.manual_seed(0)
    if name == "resnet50":
        return models.ResNet50().eval(), torch.randn(1, 3, 224, 224), "ResNet-50-sized CNN, batch 1, 224x224"
    if name == "vit_b16":
        return models.ViTB16().eval(), torch.randn(1, 3, 224, 224), "ViT-B/16-sized encoder, batch 1, 224x224"
    if name == "gpt2":
        model, source = models.gpt2_small()
        return model.eval(), torch.randint(0, 50257, (1, 128)), f"GPT-2 small ({source}), 128 tokens"
    if name == "mlp10k":
        return models.deep_mlp(10_000).eval(), torch.randn(1, 16), "10,000-layer MLP (19,999 modules)"
    if name == "llama7b_meta":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.zoo import Decoder

        with torch.device("meta"):
            model = Decoder(vocab=32000, dim=4096, layers=32, hidden=11008, heads=32)
        return model, torch.randint(0, 32000, (1, 16)), "LLaMA-7B-style decoder built on meta, 16 tokens"
    if name == "mixtral8x7b_meta":
        import transformers

        config = transformers.MixtralConfig(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2,
        )  # fmt: skip
        with torch.device("meta"):
            model = transformers.MixtralForCausalLM(config)
        batch = torch.randint(0, 32000, (1, 16), device="meta")
        return model, batch, "Mixtral-8x7B (transformers) built on meta, 16 tokens"
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def time_once(func: Callable[[], Any]) -> float:
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


def measure(name: str, repeats: int) -> dict[str, Any]:
    from pytest_modelhooks import model_sizes, model_summary

    model, batch, title = build(name)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    on_meta = next(model.parameters()).device.type == "meta"

    def forward() -> None:
        with torch.no_grad():
            model(batch)

    contenders: dict[str, Callable[[], Any]] = {}
    if not on_meta:
        contenders["forward"] = forward
    contenders["model_summary"] = lambda: model_summary(model, input_data=batch)
    contenders["model_sizes"] = lambda: model_sizes(model, input=batch, modules="all")
    if not on_meta:
        contenders["model_sizes_real"] = lambda: model_sizes(model, input=batch, modules="all", engine="real")
    try:
        import torchinfo

        if on_meta:
            contenders["torchinfo"] = lambda: torchinfo.summary(
                model, input_data=batch, device="meta", verbose=0
            )
        else:
            contenders["torchinfo"] = lambda: torchinfo.summary(model, input_data=batch, verbose=0)
    except ImportError:
        pass

    summary = model_summary(model, input_data=batch)  # warm-up, and the facts to report
    failures: dict[str, str] = {}
    for key, func in list(contenders.items()):
        try:
            func()
        except Exception as error:  # a peer that cannot run the model: reported, not timed
            if key != "torchinfo":
                raise
            failures[key] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
            del contenders[key]
    times: dict[str, list[float]] = {key: [] for key in contenders}
    for _ in range(repeats):
        for key, func in contenders.items():
            times[key].append(time_once(func))
    medians = {key: statistics.median(values) for key, values in times.items()}
    spread = {key: (min(values), max(values)) for key, values in times.items()}
    result: dict[str, Any] = {
        "model": name,
        "title": title,
        "engine": summary.engine,
        "total_params": summary.total_params,
        "true_params": sum(param.numel() for param in model.parameters()),
        "median_s": medians,
        "spread_s": spread,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_start) / 1024,
    }
    if failures:
        result["failed"] = failures
    if "torchinfo" in contenders:
        import torchinfo

        kwargs: dict[str, Any] = {"device": "meta"} if on_meta else {}
        info = torchinfo.summary(model, input_data=batch, verbose=0, **kwargs)
        result["torchinfo_params"] = info.total_params
    return result


def _rss_now_mb() -> float:
    # current resident set (ru_maxrss is a peak, which torch's import may already exceed)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def meta_only_memory() -> dict[str, Any]:
    """The 7B meta summary's RSS above the interpreter's baseline (torch imported), with the
    model and its summary still alive."""
    baseline = _rss_now_mb()
    from pytest_modelhooks import model_summary

    model, batch, _ = build("llama7b_meta")
    start = time.perf_counter()
    summary = model_summary(model, input_data=batch)
    seconds = time.perf_counter() - start
    grown = _rss_now_mb() - baseline
    return {
        "seconds": seconds,
        "rss_above_baseline_mb": grown,
        "params": summary.total_params,
        "model": model is not None,
    }


def report(results: list[dict[str, Any]]) -> str:
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; ratios are medians from one process",
        "",
        f"{'model':<52} {'engine':<6} {'summary':>9} {'vs fwd':>7} {'vs torchinfo':>13} {'sizes':>9} "
        f"{'sizes real':>10} {'peak RSS':>9}",
    ]
    for result in results:
        med = result["median_s"]
        fwd = med.get("forward")
        vs_fwd = f"{med['model_summary'] / fwd:.2f}x" if fwd else "-"
        vs_ti = f"{med['torchinfo'] / med['model_summary']:.1f}x faster" if "torchinfo" in med else "-"
        if "torchinfo" in result.get("failed", {}):
            vs_ti = "fails"
        real = f"{med['model_sizes_real'] * 1000:.0f} ms" if "model_sizes_real" in med else "-"
        lines.append(
            f"{result['title']:<52} {result['engine']:<6} {med['model_summary'] * 1000:>6.0f} ms {vs_fwd:>7} "
            f"{vs_ti:>13} {med['model_sizes'] * 1000:>6.0f} ms {real:>10} {result['peak_rss_mb']:>6.0f} MB"
        )
    lines.append("")
    for result in results:
        counted = f"params: ours {result['total_params']:,}, parameters() {result['true_params']:,}"
        if "torchinfo_params" in result:
            counted += f", torchinfo {result['torchinfo_params']:,}"
        for peer, error in result.get("failed", {}).items():
            counted += f"; {peer} failed ({error})"
        lines.append(f"{result['title']}: {counted}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--meta-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.repeats)))
        return
    if args.meta_memory:
        print(json.dumps(meta_only_memory()))
        return
    results = []
    for name in args.models.split(","):
        out = subprocess.run(
            [sys.executable, __file__, "--one", name, "--repeats", str(args.repeats)],
            check=True,
            capture_output=True,
            text=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"measured {name}", file=sys.stderr)
    memory = subprocess.run(
        [sys.executable, __file__, "--meta-memory"], check=True, capture_output=True, text=True
    )
    meta = json.loads(memory.stdout.strip().splitlines()[-1])
    text = report(results)
    text += (
        f"\n7B meta summary, first call in a fresh process: {meta['seconds']:.2f} s, "
        f"{meta['rss_above_baseline_mb']:.0f} MB more resident than the interpreter with torch imported"
    )
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "meta_7b": meta}, indent=2))


if __name__ == "__main__":
    main()
