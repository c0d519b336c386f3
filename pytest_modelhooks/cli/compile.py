"""``modelhooks compile``: torch.compile's graph breaks on one random batch, named at the module
and the line; exit 1 when there are more than ``--max-graph-breaks``."""

from __future__ import annotations

import argparse
from typing import Any

from pytest_modelhooks.cli.common import SHAPE_FORMS, UsageError, dumps, parse_shape, random_batch

NAME = "compile"
HELP = "list torch.compile's graph breaks, named at the module and the line"
FORMATS = ("text", "json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input-size", required=True, help=f"full input shape, batch included: {SHAPE_FORMS}"
    )
    parser.add_argument(
        "--max-graph-breaks", default="0", help="exit with 1 above this many breaks (default 0)"
    )


def run(model: Any, args: argparse.Namespace) -> int:
    from pytest_modelhooks.compile import graph_breaks
    from pytest_modelhooks.findings import format_findings

    try:
        allowed = int(args.max_graph_breaks)
    except ValueError:
        allowed = -1
    if allowed < 0:
        raise UsageError(f"--max-graph-breaks {args.max_graph_breaks!r}: expected a non-negative integer")
    shape = parse_shape(args.input_size, "--input-size")
    found = graph_breaks(model, random_batch(model, shape, args.seed, args.device), **args.kwargs)
    total = sum(int(finding.observed) for finding in found)
    if args.format == "json":
        print(dumps({"graph_breaks": total, "allowed": allowed, "places": [vars(f) for f in found]}))
    elif found:
        print(f"{total} graph break(s) in {len(found)} place(s), {allowed} allowed:")
        print(format_findings(found, unit="call"))
    else:
        print(f"No graph breaks: {type(model).__name__} compiles whole on a {args.input_size} input.")
    return 1 if total > allowed else 0
