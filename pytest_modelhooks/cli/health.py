"""``modelhooks health``: random batches through the model, activation (and gradient) statistics,
findings for the bounds given; exit 1 on a finding.

The bound options are those of :data:`pytest_modelhooks.health.bounds.BOUNDS`, checked before
the model runs.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

from pytest_modelhooks.cli.common import (
    SHAPE_FORMS,
    UsageError,
    add_decoder_inputs,
    default_input_size,
    dumps,
    parse_shape,
    raise_naming_the_layer,
    random_batch,
)
from pytest_modelhooks.health.bounds import ACTIVATION_BOUNDS, BOUNDS, GRADIENT_BOUNDS, check_order

NAME = "health"
HELP = "run random batches and check activation health"
FORMATS = ("text", "json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input-size",
        help=f"full input shape, batch included: {SHAPE_FORMS} (default: a batch of 16 shaped as "
        "the first layer that reads the input implies)",
    )
    parser.add_argument("--batches", type=int, default=3, help="forward passes to record (default 3)")
    parser.add_argument(
        "--train", action="store_true", help="train mode, a backward per batch, gradients too"
    )
    parser.add_argument("--modules", default="params", help="params (default), all, leaves, a name or a glob")
    parser.add_argument(
        "--exclude",
        help="modules the bounds do not judge (zero-initialised by design): names or globs, comma-separated",
    )
    for bound in BOUNDS.values():
        suffix = " (--train)" if bound.applies_to == "gradients" else ""
        if bound.kind == "range":
            parser.add_argument(bound.option, help=f"{bound.help}{suffix}")
        else:
            parser.add_argument(bound.option, type=float, help=f"{bound.help}{suffix}")
    parser.add_argument(
        "--plot",
        metavar="DIR",
        help="write DIR/activations.png (and with --train DIR/gradients.png); needs matplotlib",
    )


def _bounds(args: argparse.Namespace) -> dict[str, Any]:
    """``{check() argument: value}`` from the options, each checked as the library checks it but
    named as the option."""
    values: dict[str, Any] = {}
    for bound in BOUNDS.values():
        given = getattr(args, bound.option.lstrip("-").replace("-", "_"))
        try:
            if bound.kind == "range":
                values[bound.name] = bound.parse(given, bound.option)
            else:
                bound.validate(given, name=bound.option)
                values[bound.name] = given
        except ValueError as error:
            raise UsageError(str(error)) from None
    try:
        check_order(values["min_norm"], values["max_norm"], "--min-grad-norm", "--max-grad-norm")
    except ValueError as error:
        raise UsageError(str(error)) from None
    return values


def _record(model: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    """The statistics of ``--batches`` random batches (with a backward of the output's mean
    square each, under ``--train``)."""
    import torch

    from pytest_modelhooks._tree import tensor_leaves
    from pytest_modelhooks.stats.activations import ActivationStats
    from pytest_modelhooks.stats.gradients import GradientStats

    args.input_size = args.input_size or default_input_size(model, (16,), NAME, args.kwargs)
    shape = parse_shape(args.input_size, "--input-size")
    add_decoder_inputs(model, args, shape[0], NAME)
    model.train(args.train)
    inputs = None
    try:
        with ActivationStats(model, args.modules) as stats, GradientStats(model) as grads:
            for batch in range(args.batches):
                inputs = random_batch(model, shape, args.seed + batch, args.device)
                with torch.set_grad_enabled(args.train):
                    output = model(inputs, **args.kwargs)
                if args.train:
                    leaves = [leaf for _, leaf in tensor_leaves(output) if leaf.is_floating_point()]
                    if not leaves or not leaves[0].requires_grad:
                        raise UsageError(
                            "--train: the model's output has no floating-point tensor that needs grad"
                        )
                    leaves[0].float().square().mean().backward()  # type: ignore[no-untyped-call]
                    model.zero_grad(set_to_none=True)
    except (RuntimeError, ValueError, TypeError):
        if inputs is not None:  # the hooks are off again: trace the failing batch
            raise_naming_the_layer(model, inputs)
        raise
    return stats, grads


def run(model: Any, args: argparse.Namespace) -> int:
    from pytest_modelhooks.findings import format_findings
    from pytest_modelhooks.report.text import snapshot_text

    if args.batches < 1:
        raise UsageError(f"--batches {args.batches}: must be >= 1")
    bounds = _bounds(args)
    stats, grads = _record(model, args)
    exclude = args.exclude or None  # (split into names by the command line's main)
    findings = stats.findings(
        **{bound.name: bounds[bound.name] for bound in ACTIVATION_BOUNDS}, exclude=exclude
    )
    gradient_bounds = {bound.name: bounds[bound.name] for bound in GRADIENT_BOUNDS}
    grad_findings = grads.findings(**gradient_bounds, exclude=exclude) if args.train else []
    plots = _plots(stats, grads, args, bounds) if args.plot else []
    if args.format == "json":
        report: dict[str, Any] = {
            "activations": stats.to_dict(),
            "findings": [vars(finding) for finding in findings + grad_findings],
        }
        if args.train:
            report["gradients"] = grads.to_dict()
        if plots:
            report["plots"] = plots
        print(dumps(report))
    else:
        print(snapshot_text(stats), end="")
        if args.train:
            print()
            print(snapshot_text(grads), end="")
        print()
        if findings:
            print(f"Activation findings ({len(findings)}):")
            print(format_findings(findings))
        if grad_findings:
            print(f"Gradient findings ({len(grad_findings)}):")
            print(format_findings(grad_findings, unit="step"))
        if not findings and not grad_findings:
            print(_nothing_found(bounds, args.train))
        for path in plots:
            print(f"plot: {path}")
    return 1 if findings or grad_findings else 0


def _nothing_found(bounds: dict[str, Any], train: bool) -> str:
    """What "no findings" means: with no bound given, only what is judged without one was."""
    if any(value is not None for value in bounds.values()):
        return "No findings with these bounds."
    options = [bound.option for bound in BOUNDS.values() if train or bound.applies_to != "gradients"]
    judged = "non-finite values" + (", unused and never-updated parameters" if train else "")
    return f"No findings; no bound was given, so only {judged} were judged ({', '.join(options)} set bounds)."


def _plots(stats: Any, grads: Any, args: argparse.Namespace, bounds: dict[str, Any]) -> list[str]:
    """The pictures ``--plot DIR`` asks for, written; their paths."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'pytest-modelhooks[plot]'")
    directory = Path(args.plot)
    written = [directory / "activations.png"]
    stats.plot(path=written[0], std=bounds["std"], max_near_zero=bounds["max_near_zero"])
    if args.train:
        written.append(directory / "gradients.png")
        grads.plot(path=written[1], max_norm=bounds["max_norm"], min_norm=bounds["min_norm"])
    return [str(path) for path in written]
