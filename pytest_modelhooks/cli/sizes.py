"""``modelhooks sizes``: the output size of each layer, as a snapshot stores it (or JSON)."""

from __future__ import annotations

import argparse
from typing import Any

from pytest_modelhooks.cli.common import SHAPE_FORMS, UsageError, dumps, parse_shape, random_batch

NAME = "sizes"
HELP = "print the output size of each layer"
FORMATS = ("text", "json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--size", help="spatial size (or sequence length) of a batch of one, such as 64,64 (or 64x64)"
    )
    parser.add_argument(
        "--input-size", help=f"a random batch of this full shape instead, batch included: {SHAPE_FORMS}"
    )
    parser.add_argument(
        "--modules",
        help="children (default; the model itself when it has none), leaves, all, params, a name or a glob",
    )


def run(model: Any, args: argparse.Namespace) -> int:
    from pytest_modelhooks.report.text import snapshot_text
    from pytest_modelhooks.sizes import model_sizes

    if args.size and args.input_size:
        raise UsageError("--size and --input-size: give one (the side of a dummy batch, or a full shape)")
    if args.input_size:
        batch = random_batch(model, parse_shape(args.input_size, "--input-size"), args.seed, args.device)
        sizes = model_sizes(model, input=batch, modules=args.modules, **args.kwargs)
    else:
        size = parse_shape(args.size, "--size") if args.size else None
        sizes = model_sizes(model, size, modules=args.modules, **args.kwargs)
    if args.format == "json":
        print(dumps(sizes.to_dict()))
    else:
        print(snapshot_text(sizes), end="")
    return 0
