"""``modelhooks compile``: torch.compile's graph breaks on one random batch, named at the module
and the line; with more ``--input-size``s, the recompilations between them; with ``--export``
or ``--onnx``, whether the model exports and agrees with eager. Exit 1 on a finding over the
allowances."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pytest_modelhooks.cli.common import (
    SHAPE_FORMS,
    UsageError,
    add_decoder_inputs,
    decoder_ids,
    default_input_size,
    dumps,
    parse_shape,
    random_batch,
)

NAME = "compile"
HELP = "list torch.compile's graph breaks and recompilations, and torch.export's failures"
FORMATS = ("text", "json")
#: --dynamic's words, as ``dynamic=`` takes them
DYNAMIC: dict[str, str | bool] = {"batch": "batch", "all": True, "none": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input-size",
        action="append",
        help=f"full input shape, batch included: {SHAPE_FORMS}; given again, the model is called at "
        "each size in turn and its recompilations listed (default: a batch of 2 shaped as the first "
        "layer that reads the input implies)",
    )
    parser.add_argument(
        "--dynamic",
        choices=tuple(DYNAMIC),
        help="batch: the first size dynamic (and the batch of --export); all: every size; none: no size "
        "(default: torch.compile's, dynamic after a size changes)",
    )
    parser.add_argument(
        "--max-graph-breaks", default="0", help="exit with 1 above this many breaks (default 0)"
    )
    parser.add_argument(
        "--max-recompiles", default=None, help="exit with 1 above this many recompilations (default: any)"
    )
    parser.add_argument(
        "--export", action="store_true", help="also torch.export the model and compare it with eager"
    )
    parser.add_argument(
        "--strict", action="store_true", help="with --export: strict export (traced by dynamo)"
    )
    parser.add_argument(
        "--onnx", action="store_true", help="also export to ONNX and compare through onnxruntime"
    )


def _count(text: str | None, option: str) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise UsageError(f"{option} {text!r}: expected a non-negative integer")
    return value


def _with_decoder_ids(
    model: Any, args: argparse.Namespace, batches: list[Any]
) -> tuple[list[Any], dict[str, Any]]:
    """An encoder-decoder's decoder ids: those of the first batch in ``args.kwargs`` (for the
    graph breaks and the export), and for the recompilations, where the batch sizes differ,
    each call as its keyword inputs with decoder ids of its own batch size. Returns the calls
    and the keyword arguments they share."""
    from pytest_modelhooks.inputs import forward_parameter_names

    sizes = list(dict.fromkeys(batch.shape[0] for batch in batches))
    add_decoder_inputs(model, args, sizes[0], NAME)
    if len(sizes) == 1 or "decoder_input_ids" not in args.kwargs:
        return batches, args.kwargs
    shared = {name: value for name, value in args.kwargs.items() if name != "decoder_input_ids"}
    ids = {size: decoder_ids(model, shared, size, args.seed, args.device) for size in sizes}
    later = ", ".join(f"{size},8" for size in sizes[1:])
    print(f"modelhooks {NAME}: decoder_input_ids of {later} for the later inputs' batches", file=sys.stderr)
    first = forward_parameter_names(model, positional=True)[0]  # (the input a batch fills)
    return [{first: batch, "decoder_input_ids": ids[batch.shape[0]]} for batch in batches], shared


def run(model: Any, args: argparse.Namespace) -> int:
    from pytest_modelhooks.compile import export_problems, graph_breaks, recompiles
    from pytest_modelhooks.findings import format_findings

    allowed = _count(args.max_graph_breaks, "--max-graph-breaks")
    assert allowed is not None
    most = _count(args.max_recompiles, "--max-recompiles")
    args.input_size = args.input_size or [default_input_size(model, (2,), NAME, args.kwargs)]
    shapes = [parse_shape(text, "--input-size") for text in args.input_size]
    dynamic = DYNAMIC[args.dynamic] if args.dynamic else None
    batches = [random_batch(model, shape, args.seed, args.device) for shape in shapes]
    calls, shared = _with_decoder_ids(model, args, batches)
    found = graph_breaks(model, batches[0], dynamic=dynamic, **args.kwargs)
    again = recompiles(model, *calls, dynamic=dynamic, **shared) if len(batches) > 1 else []
    exported: dict[str, list[Any]] = {}
    export_shapes = "batch" if args.dynamic == "batch" else None
    for wanted, to in ((args.export, "torch"), (args.onnx, "onnx")):
        if wanted:
            try:
                exported[to] = export_problems(
                    model, batches[0], dynamic_shapes=export_shapes, strict=args.strict, to=to, **args.kwargs
                )
            except ImportError as missing:
                raise UsageError(f"--onnx: {missing}") from None
    breaks = sum(int(f.observed) for f in found if f.statistic == "graph break")
    count = sum(f.statistic == "recompile" for f in again)
    failing = (
        breaks > allowed
        or any(f.statistic in ("not compiled", "specialized", "recompile limit") for f in [*found, *again])
        or (most is not None and count > most)
        or any(exported.values())
    )
    if args.format == "json":
        data: dict[str, Any] = {
            "graph_breaks": breaks,
            "allowed": allowed,
            "places": [vars(f) for f in found],
        }
        if len(batches) > 1:
            data |= {"recompiles": count, "max_recompiles": most, "recompilations": [vars(f) for f in again]}
        data |= {f"export_{to}": [vars(f) for f in problems] for to, problems in exported.items()}
        print(dumps(data))
        return 1 if failing else 0
    if found:
        print(f"{breaks} graph break(s) in {len(found)} place(s), {allowed} allowed:")
        print(format_findings(found, unit="call"))
    else:
        print(f"No graph breaks: {type(model).__name__} compiles whole on a {args.input_size[0]} input.")
    if len(batches) > 1:
        sizes = "; ".join(args.input_size)
        if again:
            limit = "" if most is None else f", {most} allowed"
            print(f"\n{count} recompilation(s) over the inputs {sizes}{limit} (call: counted from 0):")
            print(format_findings(again, unit="call"))
        else:
            print(f"\nNo recompilation over the inputs {sizes}.")
    for to, problems in exported.items():
        what = "torch.export" if to == "torch" else "ONNX export"
        if problems:
            print(f"\n{what}: {len(problems)} problem(s):")
            print(format_findings(problems, unit="call"))
        else:
            second = " and at twice the batch" if export_shapes else ""
            print(f"\n{what}: exports, and agrees with eager at {args.input_size[0]}{second}.")
    return 1 if failing else 0
