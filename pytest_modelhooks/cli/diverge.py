"""``modelhooks diverge``: where the model and its counterpart part on one random batch (bf16 or
fp16 autocast, channels_last, CUDA, compiled, a second run), the first module whose output
differs while its inputs agree; exit 1 when they part. ``--fingerprints`` prints the per-layer
numbers a snapshot pins instead."""

from __future__ import annotations

import argparse
from typing import Any

from pytest_modelhooks.cli.common import (
    SHAPE_FORMS,
    UsageError,
    add_decoder_inputs,
    default_input_size,
    dumps,
    parse_shape,
    random_batch,
)

NAME = "diverge"
HELP = "name the first module where the model and its bf16, channels_last, compiled... run part"
FORMATS = ("text", "json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pytest_modelhooks.divergence.first import AGAINST

    parser.add_argument(
        "--input-size",
        help=f"full input shape, batch included: {SHAPE_FORMS} (default: a batch of 2 shaped as "
        "the first layer that reads the input implies)",
    )
    parser.add_argument("--against", choices=AGAINST, help="the run to compare with")
    parser.add_argument("--rtol", type=float, help="relative tolerance (default: per dtype)")
    parser.add_argument("--atol", type=float, help="absolute tolerance (default: per dtype)")
    parser.add_argument(
        "--fingerprints", action="store_true", help="print each module call's numbers (a snapshot's)"
    )


def run(model: Any, args: argparse.Namespace) -> int:
    from pytest_modelhooks.divergence import fingerprints, first_divergence
    from pytest_modelhooks.findings import format_findings
    from pytest_modelhooks.report.text import snapshot_text

    args.input_size = args.input_size or default_input_size(model, (2,), NAME, args.kwargs)
    shape = parse_shape(args.input_size, "--input-size")
    add_decoder_inputs(model, args, shape[0], NAME)
    batch = random_batch(model, shape, args.seed, args.device)
    if args.fingerprints:
        if args.against:
            raise UsageError("--fingerprints and --against: give one")
        print(snapshot_text(fingerprints(model, batch, **args.kwargs)), end="")
        return 0
    if not args.against:
        raise UsageError("--against is needed (or --fingerprints)")
    try:
        found = first_divergence(
            model, batch, against=args.against, rtol=args.rtol, atol=args.atol, **args.kwargs
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.format == "json":
        parted = [vars(finding) for finding in found]
        print(dumps({"against": args.against, "same": not found, "divergences": parted}))
    elif found:
        first = found[0]
        print(
            f"{type(model).__name__} and its {args.against} run part at {first.layer or '(model)'} "
            f"({first.layer_type}); {len(found)} module(s) where a difference starts:"
        )
        print(format_findings(found, unit=""))
    else:
        name, size = type(model).__name__, args.input_size
        print(f"{name} agrees with its {args.against} run at every module on a {size} input.")
    return 1 if found else 0
