"""``modelhooks learn``: the standard recipe's first checks on one random batch with random
targets: the loss at init is chance, a copy memorises the batch, the output depends on the
input (and for token ids, on each position); exit 1 when one fails, with its reason."""

from __future__ import annotations

import argparse
import math
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

NAME = "learn"
HELP = "check that the untrained loss is chance, one batch is memorised and the input is used"
FORMATS = ("text", "json")
CHECKS = ("init", "overfit", "input")
LOSSES = ("cross-entropy", "bce", "mse")
#: check_overfits' optimizers by name (named here: the parser is built without importing torch)
OPTIMIZERS = ("adam", "adamw", "sgd", "sgd-momentum")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input-size",
        help=f"full input shape, batch included: {SHAPE_FORMS} (default: a batch of 8 shaped as "
        "the first layer that reads the input implies)",
    )
    parser.add_argument(
        "--loss",
        choices=LOSSES,
        default="cross-entropy",
        help="the loss, against random targets shaped from the output: class ids for cross-entropy "
        "(classes second, or last for a token model's (batch, length, vocab)), 0/1 for bce, "
        "standard normal values for mse (default: cross-entropy)",
    )
    parser.add_argument("--output", help="the part of the output the loss takes: a key or attribute")
    parser.add_argument(
        "--checks",
        default=",".join(CHECKS),
        help=f"which checks, comma-separated: {', '.join(CHECKS)} (default: all)",
    )
    parser.add_argument("--rtol", type=float, default=0.15, help="the loss at init's tolerance (0.15)")
    parser.add_argument(
        "--expected", type=float, help="the loss at init expected (default: chance; needed for mse)"
    )
    parser.add_argument("--steps", type=int, default=500, help="most steps to memorise it (500)")
    parser.add_argument("--lr", type=float, default=1e-3, help="the learning rate (1e-3)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="the optimizer (adam)")


def _checks(text: str) -> list[str]:
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [part for part in chosen if part not in CHECKS]
    if unknown or not chosen:
        raise UsageError(f"--checks {text!r}: expected some of {', '.join(CHECKS)}, comma-separated")
    return chosen


def _loss_fn(name: str) -> Any:
    from torch import nn

    return {
        "cross-entropy": nn.functional.cross_entropy,
        "bce": nn.functional.binary_cross_entropy_with_logits,
        "mse": nn.functional.mse_loss,
    }[name]


def random_targets(model: Any, inputs: Any, args: argparse.Namespace) -> tuple[Any, str, float | None]:
    """Targets for ``--loss`` shaped from what the loss takes of one forward's output (run
    without gradients, buffers put back), drawn from ``--seed``; what they are, in words; and
    the loss of chance against them (None for mse)."""
    import torch

    from pytest_modelhooks.dependence.calls import select_output
    from pytest_modelhooks.inputs import normalise_input
    from pytest_modelhooks.tracing.state import buffers_kept
    from pytest_modelhooks.training.sanity import loss_input

    call_args, call_kwargs = normalise_input(inputs, "input", model)
    try:
        with buffers_kept(model), torch.no_grad():
            output = model(*call_args, **{**call_kwargs, **args.kwargs})
    except (RuntimeError, ValueError, TypeError):
        raise_naming_the_layer(model, inputs)
        raise
    try:
        if args.output is not None:
            output = select_output(output, args.output, "--output")
    except (AttributeError, KeyError, ValueError, TypeError) as error:
        reason = str(error.args[0] if error.args else error)
        said = reason if reason.startswith("--output") else f"--output {args.output!r}: {reason}"
        raise UsageError(said) from None
    try:
        given = loss_input(output, None, _loss_fn(args.loss), NAME)
    except TypeError:
        given = output
    if not (isinstance(given, torch.Tensor) and given.is_floating_point()):
        got = f"a {given.dtype} tensor" if isinstance(given, torch.Tensor) else f"a {type(given).__name__}"
        raise UsageError(f"--loss {args.loss}: the model returned {got}, not logits; pick them with --output")
    generator = torch.Generator().manual_seed(args.seed + 1)
    shape = tuple(given.shape)
    if args.loss == "bce":
        target = torch.randint(0, 2, shape, generator=generator).float()
        return target.to(given.device), f"0/1 labels {shape}", math.log(2.0)
    if args.loss == "mse":
        return torch.randn(shape, generator=generator).to(given.device), f"normal values {shape}", None
    # a token model: some input of ids (the encoder's, or an encoder-decoder's decoder ids)
    # has the logits' shape without their last dimension
    given_inputs = [*call_args, *call_kwargs.values(), *args.kwargs.values()]
    tokens = any(
        isinstance(ids, torch.Tensor) and not ids.is_floating_point() and ids.shape == shape[:-1]
        for ids in given_inputs
    )
    # classes second, as torch lays them out; last for a token model's (batch, length, vocab)
    at = given.dim() - 1 if tokens or given.dim() == 2 else 1
    if given.dim() < 2 or shape[at] < 2:
        raise UsageError(
            f"--loss cross-entropy: the output {shape} has no dimension of 2 or more classes "
            "(batch, classes, ...); --loss bce for one logit, mse for values"
        )
    classes = shape[at]
    target = torch.randint(0, classes, shape[:at] + shape[at + 1 :], generator=generator)
    described = f"class ids {tuple(target.shape)} of {classes} classes"
    return target.to(given.device), described, math.log(classes)


def run(model: Any, args: argparse.Namespace) -> int:
    from pytest_modelhooks.findings import HealthError
    from pytest_modelhooks.training import check_loss_at_init, check_overfits, input_use

    checks = _checks(args.checks)
    if not (args.steps > 0 and args.lr >= 0 and args.rtol > 0):
        bad = "--steps" if args.steps <= 0 else "--lr" if args.lr < 0 else "--rtol"
        value = {"--steps": args.steps, "--lr": args.lr, "--rtol": args.rtol}[bad]
        raise UsageError(f"{bad} {value}: must be positive" + (" or 0" if bad == "--lr" else ""))
    args.input_size = args.input_size or default_input_size(model, (8,), NAME, args.kwargs)
    shape = parse_shape(args.input_size, "--input-size")
    add_decoder_inputs(model, args, shape[0], NAME)
    inputs = random_batch(model, shape, args.seed, args.device)
    target, described, chance = random_targets(model, inputs, args)
    loss_fn, options = _loss_fn(args.loss), {"output": args.output, "seed": args.seed, **args.kwargs}
    results: dict[str, dict[str, Any]] = {}
    if "init" in checks:
        if args.loss == "mse" and args.expected is None:
            results["init"] = {"passed": None, "note": "not judged: mse has no chance value; give --expected"}
        else:
            expected = args.expected if args.expected is not None else chance
            try:
                loss = check_loss_at_init(
                    model, (inputs, target), loss_fn, expected=args.expected, rtol=args.rtol, **options
                )
                results["init"] = {"passed": True, "loss": loss, "expected": expected}
            except HealthError as error:
                results["init"] = _failed(error)
    if "overfit" in checks:
        try:
            curve = check_overfits(
                model,
                (inputs, target),
                loss_fn,
                steps=args.steps,
                optimizer=args.optimizer,
                lr=args.lr,
                **options,
            )
            numbers = {"first": curve.first, "best": curve.best, "last": curve.last, "target": curve.target}
            results["overfit"] = {"passed": True, "curve": str(curve), **numbers, "losses": curve.losses}
        except HealthError as error:
            results["overfit"] = _failed(error)
    if "input" in checks:
        unused = input_use(model, inputs, **args.kwargs)
        results["input"] = {"passed": not unused, "findings": [vars(finding) for finding in unused]}
        if unused:
            from pytest_modelhooks.findings import format_findings

            results["input"]["message"] = "the output does not depend on\n" + format_findings(unused, unit="")
    failed = any(result["passed"] is False for result in results.values())
    if args.format == "json":
        verdict = {"input_size": list(shape), "targets": described, "passed": not failed}
        print(dumps({**verdict, "checks": results}))
    else:
        print(f"{type(model).__name__} on a {args.input_size} input against random {described}:")
        _print_text(args, results)
    return 1 if failed else 0


def _failed(error: Any) -> dict[str, Any]:
    """A failed check in the report: the library's message and its findings (what was observed
    against which bound, at which layer)."""
    return {"passed": False, "message": str(error), "findings": [vars(finding) for finding in error.findings]}


def _print_text(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    for check, result in results.items():
        title = {"init": "loss at init", "overfit": "memorises the batch", "input": "uses its input"}[check]
        if result["passed"] is None:
            print(f"  {title}: {result['note']}")
        elif not result["passed"]:
            print(f"  {title}: FAILED\n" + _indented(result["message"]))
        elif check == "init":
            against = "chance" if args.expected is None else "expected"
            print(f"  {title}: ok, {result['loss']:.4g} ({against} {result['expected']:.4g})")
        elif check == "overfit":
            print(f"  {title}: ok, {result['curve']}")
        else:
            print(f"  {title}: ok")


def _indented(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
