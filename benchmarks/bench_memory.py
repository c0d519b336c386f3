"""model_memory: its figure beside torchinfo's estimate and the measured truth, and its time
beside one real training step; then a LLaMA-7B-style model on the meta device.

    python benchmarks/bench_memory.py [--json PATH] [--skip-7b] [--device cuda]

For each model (ResNet-50-, ViT-B/16- and GPT-2-sized, random init, AdamW, train mode):
``model_memory`` on fake tensors (time and peak); the truth, the same tracker through a real
step (``engine="real"``: every live storage, measured), or on a GPU
``torch.cuda.max_memory_allocated()`` of a real second step; torchinfo's "Estimated Total
Size" (params + input + two times every module's output) where torchinfo is installed; and the
time of one real training step. All in one process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import ResNet50, ViTB16, gpt2_small

from pytest_modelhooks.memory import model_memory
from pytest_modelhooks.units import format_bytes


def _gpt2() -> nn.Module:
    model, _ = gpt2_small()
    return model


def _loss(output: Any) -> torch.Tensor:
    logits = output.logits if hasattr(output, "logits") else output
    return logits.float().sum()


CASES: list[tuple[str, Callable[[], nn.Module], Callable[[int], torch.Tensor], int]] = [
    ("ResNet-50", ResNet50, lambda b: torch.randn(b, 3, 224, 224), 8),
    ("ViT-B/16", ViTB16, lambda b: torch.randn(b, 3, 224, 224), 8),
    ("GPT-2 small", _gpt2, lambda b: torch.randint(0, 50257, (b, 256)), 4),
]


def real_step_seconds(model: nn.Module, batch: torch.Tensor) -> float:
    """One real training step (forward, backward, AdamW step), after a first one."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        _loss(model(batch)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    if batch.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if batch.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def cuda_peak(model: nn.Module, batch: torch.Tensor) -> int:
    """``torch.cuda.max_memory_allocated()`` over a second real step (the first allocated the
    optimizer's state), minus what was allocated before it besides the model, its state and batch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        _loss(model(batch)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def torchinfo_estimate(model: nn.Module, batch: torch.Tensor) -> int | None:
    try:
        import torchinfo
    except ImportError:
        return None
    stats = torchinfo.summary(model, input_data=[batch], verbose=0, mode="train", device=batch.device)
    return int(stats.total_input + stats.total_output_bytes + stats.total_param_bytes)


def llama_7b() -> dict[str, Any]:
    """In a process of its own: its peak resident memory is this measurement's alone."""
    code = """
import json, sys, time, torch
sys.path.insert(0, ".")


def high_water() -> int:  # VmHWM: this process's peak resident memory (ru_maxrss survives exec)
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


from tests.zoo import Decoder
from pytest_modelhooks.memory import model_memory
model_memory(torch.nn.Linear(2, 2), torch.randn(1, 2))  # imports and first-call costs
before = high_water()
start = time.perf_counter()
with torch.device("meta"):
    model = Decoder(vocab=32000, dim=4096, layers=32, hidden=11008, heads=32)
report = model_memory(model, input_size=(1, 2048), autocast=torch.bfloat16, device="cuda")
seconds = time.perf_counter() - start
grown = high_water() - before
total = high_water()
print(json.dumps({"seconds": seconds, "rss_growth_bytes": grown, "process_peak_rss_bytes": total,
                  "peak_bytes": report.peak_bytes, "headline": report.headline()}))
"""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--skip-7b", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none"
    print(
        f"# {datetime.date.today()}  torch {torch.__version__}  "
        f"{platform.processor() or platform.machine()}  {os.cpu_count()} cores  GPU: {gpu}"
    )
    print(
        "# python benchmarks/bench_memory.py" + (f" --device {args.device}" if args.device != "cpu" else "")
    )
    rows: list[dict[str, Any]] = []
    header = f"{'model':12} {'batch':>5} {'ours':>10} {'truth':>10} {'ours/truth':>10} {'torchinfo':>10}"
    print(header + f" {'trace s':>8} {'step s':>8} {'step/trace':>10}")
    model_memory(nn.Linear(2, 2), torch.randn(1, 2))  # imports and first-call costs, not timed
    for name, build, make, batch_size in CASES:
        torch.manual_seed(0)
        model = build().to(device)
        batch = make(batch_size).to(device)
        start = time.perf_counter()
        ours = model_memory(model, batch, loss=_loss)
        trace_s = time.perf_counter() - start
        if device.type == "cuda":
            truth = cuda_peak(model, batch)
        else:
            truth = model_memory(model, batch, loss=_loss, engine="real").peak_bytes
        step_s = real_step_seconds(model, batch)
        estimate = torchinfo_estimate(model, batch)
        shown = format_bytes(estimate) if estimate is not None else "-"
        print(
            f"{name:12} {batch_size:>5} {format_bytes(ours.peak_bytes):>10} {format_bytes(truth):>10} "
            f"{ours.peak_bytes / truth:>10.3f} {shown:>10} {trace_s:>8.2f} {step_s:>8.2f} "
            f"{step_s / trace_s:>10.2f}"
        )
        rows.append(
            {
                "model": name,
                "batch": batch_size,
                "ours": ours.peak_bytes,
                "truth": truth,
                "torchinfo": estimate,
                "trace_seconds": trace_s,
                "step_seconds": step_s,
                "peak_phase": ours.peak_phase,
            }
        )
    result: dict[str, Any] = {
        "rows": rows,
        "torch": torch.__version__,
        "gpu": gpu,
        "date": str(datetime.date.today()),
    }
    if not args.skip_7b:
        big = llama_7b()
        print(
            f"LLaMA-7B-style on meta, AdamW, bf16 autocast, 1x2048 tokens, CUDA block sizes: "
            f"{big['seconds']:.1f} s, resident memory +{format_bytes(big['rss_growth_bytes'])} "
            f"(the whole process: {format_bytes(big['process_peak_rss_bytes'])}); "
            f"{big['headline']}"
        )
        result["llama_7b"] = big
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
