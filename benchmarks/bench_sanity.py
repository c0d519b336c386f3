"""What the checkpoint, training-sanity and divergence checks cost: seconds per check on the test
zoo's models and a ResNet-50-sized CNN, beside one eager forward.

    python benchmarks/bench_sanity.py

``loads``: ``state_dict_spec`` and ``load_problems`` against the model's own state dict;
``loss@init``: ``check_loss_at_init``; ``overfit``: ``check_overfits`` with its defaults (Adam
at 1e-3, until the loss falls to a tenth, at most 500 steps; the steps it took in brackets);
``uses input``: ``check_uses_input``; ``bf16``/``channels_last``/``again``:
``first_divergence``. All in one process, CPU.

    python benchmarks/bench_sanity.py --cache

``first_divergence`` of a 12-layer GPT-2-sized decoder (transformers, from a config) given the
key/value cache of 512 earlier tokens: what its recording keeps of the cache, and the seconds
against ``"again"``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import ResNet50

from pytest_modelhooks.checkpoint import load_problems
from pytest_modelhooks.divergence import first_divergence
from pytest_modelhooks.training import check_loss_at_init, check_overfits, check_uses_input
from tests import zoo


def _seconds(call: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", action="store_true", help="a decoder given a key/value cache instead")
    cache = parser.parse_args().cache
    print(
        f"# {datetime.date.today()}  torch {torch.__version__}  "
        f"{platform.processor() or platform.machine()}  {os.cpu_count()} cores"
    )
    print("# python benchmarks/bench_sanity.py" + (" --cache" if cache else ""))
    if cache:
        _cached_decoder()
        return
    cases = []
    for name in ("mlp", "resnetish", "unet", "transformer"):
        model, batch = zoo.build(name)
        cases.append((name, model, batch))
    torch.manual_seed(0)
    cases.append(("ResNet-50-sized, 4x3x224x224", ResNet50(), torch.randn(4, 3, 224, 224)))
    header = ["model", "loads", "loss@init", "overfit", "uses input", "bf16", "ch_last", "again", "fwd ms"]
    print(f"{header[0]:30}" + "".join(f"{cell:>12}" for cell in header[1:]))
    for name, model, batch in cases:
        print(f"{name:30}" + "".join(f"{cell:>12}" for cell in _row(model, batch)))


def _row(model: nn.Module, batch: torch.Tensor) -> list[str]:
    output = model(batch)
    classifier = output.dim() == 2
    labels = torch.randint(0, output.shape[-1], (batch.shape[0],))
    target = labels if classifier else torch.randn_like(output)
    loss_fn = nn.functional.cross_entropy if classifier else nn.functional.mse_loss
    loads, _ = _seconds(lambda: load_problems(model, model.state_dict()))
    at_init = f"{_seconds(lambda: check_loss_at_init(model, (batch, target)))[0]:.2f}" if classifier else "-"
    overfit, curve = _seconds(lambda: check_overfits(model, (batch, target), loss_fn))
    uses, _ = _seconds(lambda: check_uses_input(model, batch))
    bf16, _ = _seconds(lambda: first_divergence(model, batch, against="bf16"))
    last = "-"
    if batch.dim() == 4:
        last = f"{_seconds(lambda: first_divergence(model, batch, against='channels_last'))[0]:.2f}"
    again, _ = _seconds(lambda: first_divergence(model.eval(), batch, against="again"))
    model.train()
    with torch.no_grad():
        forward, _ = _seconds(lambda: model(batch))
    return [
        f"{loads:.3f}",
        at_init,
        f"{overfit:.2f} ({len(curve.losses)})",
        f"{uses:.2f}",
        f"{bf16:.2f}",
        last,
        f"{again:.2f}",
        f"{forward * 1000:.1f}",
    ]


def _cached_decoder(layers: int = 12, past: int = 512) -> None:
    import warnings

    import transformers

    from pytest_modelhooks.divergence.calls import record_calls

    warnings.filterwarnings("ignore", category=FutureWarning)  # (past_key_values= renamed cache=)

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=layers, n_embd=768, n_head=12, vocab_size=1000, n_positions=1024)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        cache = model(torch.randint(0, 1000, (1, past))).past_key_values
    ids = torch.randint(0, 1000, (1, 4))
    recorded, calls = _seconds(lambda: record_calls(model, (ids,), {"past_key_values": cache}))
    storages: dict[int, int] = {}
    for call in calls:
        for value in (*call.args, *call.kwargs.values()):
            for layer in getattr(value, "layers", None) or []:
                for tensor in (layer.keys, layer.values):
                    if isinstance(tensor, torch.Tensor):
                        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    given = sum(t.untyped_storage().nbytes() for layer in cache.layers for t in (layer.keys, layer.values))
    again, found = _seconds(lambda: first_divergence(model, ids, past_key_values=cache, against="again"))
    print(f"{layers} layers, a cache of {past} tokens ({given / 2**20:.0f} MiB), 4 new tokens:")
    print(
        f"  the recording keeps {sum(storages.values()) / 2**20:.0f} MiB of cache in {len(storages)} storages"
    )
    print(f"  record_calls {recorded:.2f} s, against 'again' {again:.2f} s ({len(found)} found)")


if __name__ == "__main__":
    main()
