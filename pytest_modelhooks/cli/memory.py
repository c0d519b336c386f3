"""``modelhooks memory``: the memory of one training step, traced on fake tensors (no GPU, no
compute), what holds it per layer, and with ``--budget`` whether it fits (exit 1 when not) or
with ``--max-batch`` the largest batch that does."""

from __future__ import annotations

import argparse
from typing import Any

from pytest_modelhooks.cli.common import SHAPE_FORMS, UsageError, dumps, parse_shape

NAME = "memory"
HELP = "print the memory of a training step, per layer, and whether it fits a budget"
FORMATS = ("text", "json", "markdown")

_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16"}
_DTYPES |= {"fp32": "float32", "float32": "float32", "fp64": "float64", "float64": "float64"}
_OPTIMIZERS = ("adamw", "adam", "sgd", "sgd-momentum", "none")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input-size", required=True, help=f"the batch's full shape, batch included: {SHAPE_FORMS}"
    )
    parser.add_argument(
        "--optimizer", default="adamw", choices=_OPTIMIZERS, help="its state is counted (default adamw)"
    )
    parser.add_argument("--mode", default="train", choices=("train", "eval"), help="eval: a no_grad forward")
    parser.add_argument("--autocast", help="run the forward under torch.autocast: bf16 or fp16")
    parser.add_argument("--dtype", help="cast the weights and the input: bf16, fp16, fp32")
    parser.add_argument(
        "--allocator",
        choices=("exact", "cuda"),
        help="size each allocation exactly, or in the CUDA allocator's 512-byte blocks "
        "(default: cuda for a model on a GPU)",
    )
    parser.add_argument("--budget", help="exit with 1 when the peak is over it: 24GiB, 80GB, 1.5e9")
    parser.add_argument(
        "--max-batch",
        action="store_true",
        help="with --budget: the largest batch that fits (the first dimension of --input-size varies)",
    )


def _dtype(text: str | None, option: str) -> Any:
    if text is None:
        return None
    import torch

    name = _DTYPES.get(text.lower())
    if name is None:
        raise UsageError(f"{option} {text!r}: expected one of bf16, fp16, fp32, fp64")
    return getattr(torch, name)


def run(model: Any, args: argparse.Namespace) -> int:
    from pytest_modelhooks.memory import max_batch_size, model_memory, parse_bytes

    shape = parse_shape(args.input_size, "--input-size")
    options: dict[str, Any] = {
        "optimizer": None if args.optimizer == "none" else args.optimizer,
        "mode": args.mode,
        "autocast": _dtype(args.autocast, "--autocast"),
        "dtype": _dtype(args.dtype, "--dtype"),
        **({"device": args.allocator if args.allocator == "cuda" else "cpu"} if args.allocator else {}),
        **args.kwargs,
    }
    budget = None
    if args.budget is not None:
        try:
            budget = parse_bytes(args.budget, "--budget")
        except ValueError as error:
            raise UsageError(str(error).replace("--budget=", "--budget ")) from None
    if args.max_batch:
        if budget is None:
            raise UsageError("--max-batch needs --budget (the memory the batch must fit in)")
        return _max_batch(model, shape, budget, options, args.format, max_batch_size)
    report = model_memory(model, input_size=shape, **options)
    if args.format == "json":
        print(dumps(report.to_dict()))
    elif args.format == "markdown":
        print(report.to_markdown(), end="")
    else:
        print(report, end="")
    if budget is not None:
        from pytest_modelhooks.memory import format_bytes

        found = report.findings(max_peak=budget)
        for finding in found:
            over = f"{format_bytes(report.peak_bytes)} > {format_bytes(budget)} (--budget {args.budget})"
            print(f"over budget: peak {over}; {finding.note}")
        return 1 if found else 0
    return 0


def _max_batch(
    model: Any, shape: tuple[int, ...], budget: int, options: dict[str, Any], form: str, search: Any
) -> int:
    from pytest_modelhooks.inputs import input_spec, make_input, model_device_dtype

    device, dtype = model_device_dtype(model)
    try:
        tokens = input_spec(model).channels if input_spec(model).layout == "tokens" else None
    except (TypeError, ValueError):
        tokens = None

    def make(batch: int) -> Any:
        return make_input((batch, *shape[1:]), device, options.get("dtype") or dtype, token_range=tokens)

    fit = search(model, make, budget, **options)
    if form == "json":
        print(
            dumps(
                {
                    "batch_size": fit.batch_size,
                    "peak_bytes": fit.peak_bytes,
                    "next_peak_bytes": fit.next_peak_bytes,
                    "budget_bytes": fit.budget_bytes,
                }
            )
        )
    else:
        print(fit)
    return 0 if fit.batch_size else 1
