"""``modelhooks sizes``: the output size of each layer, as a snapshot stores it (or JSON)."""

from __future__ import annotations

import argparse
from typing import Any

from pytest_modelhooks.cli.common import dumps, parse_shape

NAME = "sizes"
HELP = "print the output size of each layer"
FORMATS = ("text", "json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--size", help="spatial size (or sequence length) of a batch of one, such as 64,64 (or 64x64)"
    )
    parser.add_argument(
        "--modules",
        help="children (default; the model itself when it has none), leaves, all, params, a name or a glob",
    )


def run(model: Any, args: argparse.Namespace) -> int:
    from pytest_modelhooks.report.text import snapshot_text
    from pytest_modelhooks.sizes import model_sizes

    size = parse_shape(args.size, "--size") if args.size else None
    sizes = model_sizes(model, size, modules=args.modules)
    if args.format == "json":
        print(dumps(sizes.to_dict()))
    else:
        print(snapshot_text(sizes), end="")
    return 0
