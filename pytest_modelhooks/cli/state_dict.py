"""``modelhooks state-dict``: every key of the model's state dict with kind, shape, dtype,
persistence and tie, as a snapshot stores it (or JSON); with ``--checkpoint``, what loading that
checkpoint would meet, exit 1 on a problem."""

from __future__ import annotations

import argparse
from typing import Any

from pytest_modelhooks.cli.common import UsageError, dumps

NAME = "state-dict"
HELP = "print the model's state-dict keys, or check that a checkpoint loads into it"
FORMATS = ("text", "json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", help="a .pt/.pth/.bin, .safetensors or .json spec file: would it load into the model?"
    )
    parser.add_argument("--key", help="where the checkpoint keeps the state dict ({'model': ...}: model)")
    parser.add_argument(
        "--no-strict", action="store_true", help="load_state_dict(strict=False): list what would be skipped"
    )
    parser.add_argument("--allow-cast", action="store_true", help="a dtype that differs is no problem")


def run(model: Any, args: argparse.Namespace) -> int:
    from pytest_modelhooks.checkpoint import load_problems, state_dict_spec
    from pytest_modelhooks.findings import format_findings

    spec = state_dict_spec(model)
    if not args.checkpoint:
        if args.key or args.no_strict or args.allow_cast:
            raise UsageError("--key, --no-strict and --allow-cast go with --checkpoint")
        print(spec.to_json() if args.format == "json" else str(spec))
        return 0
    try:
        found = load_problems(
            spec, args.checkpoint, strict=not args.no_strict, key=args.key, allow_cast=args.allow_cast
        )
    except (FileNotFoundError, ValueError, KeyError, ImportError) as error:
        raise UsageError(f"--checkpoint {args.checkpoint!r}: {error}") from None
    if args.format == "json":
        print(
            dumps({"checkpoint": args.checkpoint, "loads": not found, "problems": [vars(f) for f in found]})
        )
    elif found:
        print(
            f"{args.checkpoint} would not load into {type(model).__name__} as saved: {len(found)} problem(s)"
        )
        print(format_findings(found, unit=""))
    else:
        print(
            f"{args.checkpoint} loads into {type(model).__name__}: {len(spec)} keys, every shape and dtype."
        )
    return 1 if found else 0
