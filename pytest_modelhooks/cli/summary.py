"""``modelhooks summary``: the model's summary, as a snapshot stores it (or JSON, markdown)."""

from __future__ import annotations

import argparse
from typing import Any

from pytest_modelhooks.cli.common import SHAPE_FORMS, UsageError, dumps, parse_shape

NAME = "summary"
HELP = "print a model summary"
FORMATS = ("text", "json", "markdown")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-size", help=f"full input shape, batch included: {SHAPE_FORMS}")
    parser.add_argument("--depth", type=int, default=None, help="fold rows deeper than this")


def run(model: Any, args: argparse.Namespace) -> int:
    from pytest_modelhooks.report.text import snapshot_text
    from pytest_modelhooks.summary.build import model_summary

    if args.depth is not None and args.depth < 0:
        raise UsageError(f"--depth {args.depth}: must be >= 0")
    input_size = parse_shape(args.input_size, "--input-size") if args.input_size else None
    result = model_summary(model, input_size, depth=args.depth, **args.kwargs)
    if args.format == "json":
        print(dumps(result.to_dict()))
    elif args.format == "markdown":
        print(result.to_markdown())
    else:
        print(snapshot_text(result), end="")
    return 0
