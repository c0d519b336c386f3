"""Command line: summaries and layer sizes outside pytest.

    python -m pytest_modelhooks summary PACKAGE.MODULE:FACTORY --input-size 1,3,224,224 \\
        [--meta] [--depth N] [--format text|json|markdown]
    python -m pytest_modelhooks sizes PACKAGE.MODULE:FACTORY --size 64,64 [--modules leaves]

``FACTORY`` is a callable returning an ``nn.Module`` (a class or a function) or a module-level
``nn.Module``; the current directory is importable. ``--meta`` builds the model on the meta
device: no memory for the weights, so even a 7B model prints in under a second. The text output
is the same text a snapshot stores, so the command can write snapshot files ahead of a test run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


class UsageError(Exception):
    """A bad command line; the message names the argument."""


def _shape(text: str, argument: str) -> tuple[int, ...]:
    # "1,3,224,224" or "1x3x224x224"; every part an integer (a stray "x" or "," is no dim)
    try:
        dims = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        dims = ()
    if not dims or any(dim <= 0 for dim in dims):
        raise UsageError(
            f"{argument} {text!r}: expected comma-separated positive integers, such as 1,3,224,224"
        )
    return dims


def _load(path: str, meta: bool) -> Any:
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"factory {path!r}: expected PACKAGE.MODULE:FACTORY, such as mypkg.models:ResNet")
    if "" not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: the current directory is importable
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UsageError(f"factory {path!r}: cannot import {module_name!r}: {error}") from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise UsageError(f"factory {path!r}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)

    import torch
    from torch import nn

    if isinstance(target, nn.Module):
        return target.to("meta") if meta else target
    if not callable(target):
        raise UsageError(f"factory {path!r}: {attribute!r} is neither an nn.Module nor callable")
    if meta:
        with torch.device("meta"):
            model = target()
    else:
        model = target()
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"factory {path!r}: calling {attribute!r} returned {type(model).__name__}, not an nn.Module"
        )
    return model


def _markdown(summary: Any) -> str:
    from pytest_modelhooks._tree import format_shape

    lines = [
        f"### {summary.model_name}",
        "",
        "| layer | type | input | output | params | mult-adds |",
        "|---|---|---|---|---:|---:|",
    ]
    for layer in summary.visible_layers:
        output = format_shape(layer.output_shapes) if layer.ran else "never ran"
        mult_adds = "" if layer.mult_adds is None else f"{layer.mult_adds:,}"
        lines.append(
            f"| `{layer.label}` | {layer.type} | {format_shape(layer.input_shapes)} | {output} | "
            f"{layer.params:,} | {mult_adds} |"
        )
    lines += [
        "",
        f"Total params: {summary.total_params:,} (trainable {summary.trainable_params:,})",
    ]
    if summary.mult_adds is not None:
        lines.append(f"Mult-adds: {summary.mult_adds:,}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pytest_modelhooks", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser("summary", help="print a model summary")
    summary.add_argument("factory", help="PACKAGE.MODULE:FACTORY")
    summary.add_argument("--input-size", help="full input shape, batch included: 1,3,224,224")
    summary.add_argument("--depth", type=int, default=None, help="fold rows deeper than this")
    summary.add_argument("--meta", action="store_true", help="build the model on the meta device")
    summary.add_argument("--format", choices=("text", "json", "markdown"), default="text")
    sizes = commands.add_parser("sizes", help="print the output size of each layer")
    sizes.add_argument("factory", help="PACKAGE.MODULE:FACTORY")
    sizes.add_argument("--size", help="spatial size (or sequence length): 64,64")
    sizes.add_argument(
        "--modules", default="children", help="children, leaves, all, params, a name or a glob"
    )
    sizes.add_argument("--meta", action="store_true", help="build the model on the meta device")
    sizes.add_argument("--format", choices=("text", "json"), default="text")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for usage errors)."""
    parser = _parser()
    args = parser.parse_args(argv)
    from pytest_modelhooks.snapshot import snapshot_text

    try:
        model = _load(args.factory, args.meta)
        if args.command == "summary":
            from pytest_modelhooks.summary import model_summary

            if args.depth is not None and args.depth < 0:
                raise UsageError(f"--depth {args.depth}: must be >= 0")
            input_size = _shape(args.input_size, "--input-size") if args.input_size else None
            result = model_summary(model, input_size, depth=args.depth)
            if args.format == "json":
                print(json.dumps(result.to_dict(), indent=2))
            elif args.format == "markdown":
                print(_markdown(result))
            else:
                print(snapshot_text(result), end="")
        else:
            from pytest_modelhooks.shapes import model_sizes

            size = _shape(args.size, "--size") if args.size else None
            sizes = model_sizes(model, size, modules=args.modules)
            if args.format == "json":
                print(json.dumps(sizes.to_dict(), indent=2))
            else:
                print(snapshot_text(sizes), end="")
    except UsageError as error:
        parser.error(str(error))  # exits with status 2
    except (ValueError, TypeError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
