"""``modelhooks leaks``: batch independence (and causality) on one random batch; exit 1 on a leak."""

from __future__ import annotations

import argparse
from typing import Any

from pytest_modelhooks.cli.common import (
    SHAPE_FORMS,
    UsageError,
    add_decoder_inputs,
    default_batch_dim,
    default_input_size,
    dumps,
    parse_indices,
    parse_shape,
    random_batch,
)

NAME = "leaks"
HELP = "check that samples do not leak into each other (and, with --causal, no look-ahead)"
FORMATS = ("text", "json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input-size",
        help=f"full input shape, batch of 2 or more: {SHAPE_FORMS} (default: a batch of 3, 5 or 7, "
        "a size no other dimension has, shaped as the first layer that reads the input implies)",
    )
    parser.add_argument("--causal", action="store_true", help="also check that no position sees later ones")
    parser.add_argument("--samples", help="the output samples to trace (default: the first and the last)")
    parser.add_argument("--positions", help="the output positions to trace with --causal (default: up to 8)")
    parser.add_argument("--output", help="the output to check: a key or attribute such as logits")
    parser.add_argument(
        "--batch-dim",
        help="the input's batch dimension (default 0 for a given --input-size; for a made batch, 1 "
        "where an RNN or attention reads the sequence first)",
    )
    parser.add_argument(
        "--seq-dim",
        help="the input's sequence dimension for --causal (default 1, or 0 when the batch is dimension 1)",
    )
    parser.add_argument("--train", action="store_true", help="keep the modules' train/eval modes")


def _dimension(text: str, option: str, shape: tuple[int, ...]) -> int:
    """``text`` as a dimension of ``shape`` (negative counts from the end), or a usage error."""
    try:
        dim = int(text)
    except ValueError:
        raise UsageError(f"{option} {text!r}: expected a dimension, an integer such as 0 or 1") from None
    if not -len(shape) <= dim < len(shape):
        sizes = ",".join(map(str, shape))
        raise UsageError(f"{option} {dim}: the input {sizes} has dimensions 0 to {len(shape) - 1}")
    return dim % len(shape)


def run(model: Any, args: argparse.Namespace) -> int:
    from pytest_modelhooks.dependence.reach import batch_leaks, causal_leaks
    from pytest_modelhooks.findings import format_findings

    # a given input is read batch first (an RNN without batch_first is then named for it); the
    # one made here is laid out as the model's first layer reads it
    dims = {"dim": 0, "seq_dim": 1}
    if not args.input_size:
        if args.batch_dim is not None:
            raise UsageError(f"--batch-dim {args.batch_dim}: needs the --input-size it is a dimension of")
        args.input_size = default_input_size(model, (3, 5, 7), NAME, args.kwargs)
        if default_batch_dim(model):
            dims = {"dim": 1, "seq_dim": 0}
    shape = parse_shape(args.input_size, "--input-size")
    if args.batch_dim is not None:
        dims["dim"] = _dimension(args.batch_dim, "--batch-dim", shape)
        dims["seq_dim"] = 0 if dims["dim"] == 1 else 1
    if args.seq_dim is not None:
        dims["seq_dim"] = _dimension(args.seq_dim, "--seq-dim", shape)
    if args.causal and dims["seq_dim"] == dims["dim"]:
        raise UsageError(
            f"--seq-dim {dims['seq_dim']}: the same dimension as the batch's; pass the other with "
            f"--seq-dim (or --batch-dim)"
        )
    if shape[dims["dim"]] < 2:
        raise UsageError(
            f"--input-size {args.input_size}: a leak needs other samples to come from: a batch of "
            f"2 or more along dimension {dims['dim']} (3 or 5, a size no other dimension has)"
        )
    add_decoder_inputs(model, args, shape[dims["dim"]], NAME)
    inputs = random_batch(model, shape, args.seed, args.device)
    options: dict[str, Any] = {"output": args.output, "train": args.train, **args.kwargs}
    samples = list(parse_indices(args.samples, "--samples")) if args.samples else None
    positions = list(parse_indices(args.positions, "--positions")) if args.positions else None
    try:
        found = batch_leaks(model, inputs, samples=samples, dim=dims["dim"], **options)
        future = (
            causal_leaks(model, inputs, positions=positions, seq_dim=dims["seq_dim"], **options)
            if args.causal
            else []
        )
    except (AttributeError, KeyError) as error:  # --output names nothing the model returns
        message = f"--output {args.output!r}: not a key or attribute of the model's output ({error})"
        raise UsageError(message) from None
    if args.format == "json":
        report = {
            "batch": [vars(f) for f in found],
            "causal": [vars(f) for f in future] if args.causal else None,
        }
        print(dumps(report))
    else:
        if found:
            print(f"Samples of the batch leak into each other ({len(found)}):")
            print(format_findings(found, unit="sample"))
        if future:
            print(f"Outputs depend on later positions ({len(future)}):")
            print(format_findings(future, unit="position"))
        if not found and not future:
            checked = "batch independent and causal" if args.causal else "batch independent"
            print(f"No leaks: {type(model).__name__} is {checked} on a {args.input_size} input.")
    return 1 if found or future else 0
