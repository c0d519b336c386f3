"""Command line: summaries and layer sizes outside pytest.

    python -m pytest_modelhooks summary PACKAGE.MODULE:FACTORY --input-size 1,3,224,224 \\
        [--meta] [--depth N] [--format text|json|markdown]
    python -m pytest_modelhooks sizes PACKAGE.MODULE:FACTORY --size 64,64 [--modules leaves]
    python -m pytest_modelhooks health PACKAGE.MODULE:FACTORY --input-size 16,3,64,64 \\
        [--batches 3] [--train] [--std 0.2,5] [--max-dead 0.3] [--max-grad-norm 100]
    python -m pytest_modelhooks leaks PACKAGE.MODULE:FACTORY --input-size 3,16 [--causal]

``FACTORY`` is a callable returning an ``nn.Module`` (a class or a function) or a module-level
``nn.Module``; the current directory is importable. ``'mypkg.models:build(depth=50)'`` calls it
with literal arguments (numbers, strings, lists, dicts...; nothing is evaluated). ``--device
cuda`` moves the model there (and makes the batches there). ``--meta`` builds the model on the meta
device: no memory for the weights, so even a 7B model prints in under a second. The text output
is the same text a snapshot stores, so the command can write snapshot files ahead of a test run.
``health`` runs random batches (standard normal values, or token ids for an embedding model)
through the model and prints its activation statistics, with ``--train`` also a backward of a
stand-in loss (the mean square of the output) and the gradient statistics, then the findings
for the bounds given; it exits with 1 when there are findings, so it can gate a CI step.
``leaks`` runs :func:`~pytest_modelhooks.leaks.batch_leaks` (and with ``--causal``
:func:`~pytest_modelhooks.leaks.causal_leaks`) on one random batch and exits with 1 when a
layer mixes samples or looks ahead.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import inspect
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "run"]


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


def _call_arguments(path: str, text: str) -> tuple[list[Any], dict[str, Any]]:
    """The literal arguments of ``FACTORY(...)`` (``depth=50, widths=[64, 128]``): numbers,
    strings, booleans, None, tuples, lists and dicts of these; nothing is evaluated."""
    try:
        call = ast.parse(f"factory({text})", mode="eval").body
        assert isinstance(call, ast.Call)
        args = [ast.literal_eval(node) for node in call.args]
        kwargs = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
    except (SyntaxError, ValueError, AssertionError):
        raise UsageError(
            f"factory {path!r}: the arguments in (...) must be Python literals, such as "
            f"mypkg.models:build(depth=50, widths=[64, 128])"
        ) from None
    if None in kwargs:  # **mapping
        raise UsageError(f"factory {path!r}: write each keyword argument out (no **)")
    return args, {str(name): value for name, value in kwargs.items()}


def _load(path: str, meta: bool) -> Any:
    module_name, _, attribute = path.partition(":")
    call_args: list[Any] = []
    call_kwargs: dict[str, Any] = {}
    called = "(" in attribute
    if called:
        attribute, _, rest = attribute.partition("(")
        if not rest.endswith(")"):
            raise UsageError(f"factory {path!r}: expected FACTORY(arguments), closed by ')'")
        call_args, call_kwargs = _call_arguments(path, rest[:-1])
    if not module_name or not attribute:
        raise UsageError(
            f"factory {path!r}: expected PACKAGE.MODULE:FACTORY, such as mypkg.models:ResNet "
            f"or 'mypkg.models:build(depth=50)'"
        )
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
        if called:  # calling it would run its forward
            raise UsageError(f"factory {path!r}: {attribute!r} is a model instance, not a factory to call")
        return target.to("meta") if meta else target
    if not callable(target):
        raise UsageError(f"factory {path!r}: {attribute!r} is neither an nn.Module nor callable")
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # no signature to check (some builtins): just call it
        signature = None
    if signature is not None:
        try:
            signature.bind(*call_args, **call_kwargs)
        except TypeError as error:  # arguments missing or unknown: say so before building
            raise UsageError(f"factory {path!r}: {error}") from None
    if meta:
        with torch.device("meta"):
            model = target(*call_args, **call_kwargs)
    else:
        model = target(*call_args, **call_kwargs)
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"factory {path!r}: calling {attribute!r} returned {type(model).__name__}, not an nn.Module"
        )
    return model


def _bounds(text: str | None, argument: str) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"{argument} {text!r}: expected low,high such as 0.2,5") from None
    return low, high


def _random_batch(model: Any, shape: tuple[int, ...], seed: int, device: Any) -> Any:
    import torch

    from pytest_modelhooks.shapes import input_spec

    # made on the CPU from a seeded generator: the same batch on every device
    generator = torch.Generator().manual_seed(seed)
    try:
        spec = input_spec(model)
    except ValueError:
        spec = None
    if spec is not None and spec.layout == "tokens":
        return torch.randint(0, spec.channels, shape, generator=generator).to(device)
    return torch.randn(shape, generator=generator).to(device)


def _device(text: str, meta: bool) -> Any:
    """The ``--device`` to run on, checked: a usage error if torch does not know it or this
    machine does not have it."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {text!r}: not a torch device, such as cpu, cuda or cuda:1") from None
    if meta and device.type != "cpu":
        raise UsageError(f"--device {text} and --meta: the model is either on meta or on {text}")
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and not (backend is not None and backend.is_available()):
        raise UsageError(f"--device {text!r}: {device.type} is not available on this machine")
    return device


#: The library's argument names in its messages, and the options that set them here.
_BOUND_OPTIONS = {
    "max_std_growth": "--max-std-growth",
    "max_near_zero": "--max-near-zero",
    "max_dead": "--max-dead",
    "max_norm": "--max-grad-norm",
    "min_norm": "--min-grad-norm",
    "std=": "--std ",
}


def _raise_naming_the_layer(model: Any, inputs: Any) -> None:
    """After a failed forward: the same forward traced (on meta stand-ins where it can), so
    that the error names the layer and the shape it got, as ``summary`` does."""
    from pytest_modelhooks.shapes import LayerError, trace_model

    try:
        trace_model(model, (inputs,))
    except LayerError as error:
        raise error from None
    except Exception:  # the trace failed some other way: the original error says more
        return


def _health(model: Any, args: argparse.Namespace) -> int:
    import torch

    from pytest_modelhooks._tree import tensor_leaves
    from pytest_modelhooks.checks import format_findings
    from pytest_modelhooks.snapshot import snapshot_text
    from pytest_modelhooks.stats import ActivationStats, GradientStats

    if args.batches < 1:
        raise UsageError(f"--batches {args.batches}: must be >= 1")
    shape = _shape(args.input_size, "--input-size")
    std = _bounds(args.std, "--std")
    model.train(args.train)
    inputs = None
    try:
        with ActivationStats(model, args.modules) as stats, GradientStats(model) as grads:
            for batch in range(args.batches):
                inputs = _random_batch(model, shape, args.seed + batch, args.device)
                with torch.set_grad_enabled(args.train):
                    output = model(inputs)
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
            _raise_naming_the_layer(model, inputs)
        raise
    try:
        findings = stats.findings(
            std=std,
            max_dead=args.max_dead,
            max_near_zero=args.max_near_zero,
            max_std_growth=args.max_std_growth,
        )
        grad_findings = (
            grads.findings(max_norm=args.max_grad_norm, min_norm=args.min_grad_norm) if args.train else []
        )
    except ValueError as error:  # a bound out of range: the command line's fault
        message = str(error)
        for name, option in _BOUND_OPTIONS.items():
            message = message.replace(name, option)
        raise UsageError(message) from None
    plots = _health_plots(stats, grads, args, std) if args.plot else []
    if args.format == "json":
        report: dict[str, Any] = {
            "activations": stats.to_dict(),
            "findings": [vars(finding) for finding in findings + grad_findings],
        }
        if args.train:
            report["gradients"] = grads.to_dict()
        if plots:
            report["plots"] = plots
        print(json.dumps(report, indent=2, default=str))
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
            print("No findings with these bounds.")
        for path in plots:
            print(f"plot: {path}")
    return 1 if findings or grad_findings else 0


def _leaks(model: Any, args: argparse.Namespace) -> int:
    from pytest_modelhooks.checks import format_findings
    from pytest_modelhooks.leaks import batch_leaks, causal_leaks

    shape = _shape(args.input_size, "--input-size")
    if shape[0] < 2:
        raise UsageError(
            f"--input-size {args.input_size}: a leak needs other samples to come from: a batch of "
            f"2 or more (3 or 5, a size no other dimension has)"
        )
    inputs = _random_batch(model, shape, args.seed, args.device)
    options: dict[str, Any] = {"output": args.output, "train": args.train}
    samples = list(_shape_or_zero(args.samples, "--samples")) if args.samples else None
    positions = list(_shape_or_zero(args.positions, "--positions")) if args.positions else None
    try:
        found = batch_leaks(model, inputs, samples=samples, **options)
        future = causal_leaks(model, inputs, positions=positions, **options) if args.causal else []
    except (AttributeError, KeyError) as error:  # --output names nothing the model returns
        message = f"--output {args.output!r}: not a key or attribute of the model's output ({error})"
        raise UsageError(message) from None
    if args.format == "json":
        report = {
            "batch": [vars(f) for f in found],
            "causal": [vars(f) for f in future] if args.causal else None,
        }
        print(json.dumps(report, indent=2, default=str))
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


def _shape_or_zero(text: str, argument: str) -> tuple[int, ...]:
    """Comma-separated non-negative integers (indices)."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or any(value < 0 for value in values):
        raise UsageError(f"{argument} {text!r}: expected comma-separated indices, such as 0,2")
    return values


def _health_plots(stats: Any, grads: Any, args: argparse.Namespace, std: Any) -> list[str]:
    """The pictures ``--plot DIR`` asks for, written; their paths."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'pytest-modelhooks[plot]'")
    directory = Path(args.plot)
    written = [directory / "activations.png"]
    stats.plot(path=written[0], std=std, max_near_zero=args.max_near_zero)
    if args.train:
        written.append(directory / "gradients.png")
        grads.plot(path=written[1], max_norm=args.max_grad_norm, min_norm=args.min_grad_norm)
    return [str(path) for path in written]


_FACTORY_HELP = "PACKAGE.MODULE:FACTORY, or 'PACKAGE.MODULE:FACTORY(depth=50, ...)' with literal arguments"


def _parser(prog: str = "python -m pytest_modelhooks") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser("summary", help="print a model summary")
    summary.add_argument("factory", help=_FACTORY_HELP)
    summary.add_argument("--input-size", help="full input shape, batch included: 1,3,224,224")
    summary.add_argument("--depth", type=int, default=None, help="fold rows deeper than this")
    summary.add_argument("--meta", action="store_true", help="build the model on the meta device")
    summary.add_argument("--device", default="cpu", help="run the model there: cpu (default), cuda, cuda:1")
    summary.add_argument("--format", choices=("text", "json", "markdown"), default="text")
    sizes = commands.add_parser("sizes", help="print the output size of each layer")
    sizes.add_argument("factory", help=_FACTORY_HELP)
    sizes.add_argument("--size", help="spatial size (or sequence length): 64,64")
    sizes.add_argument(
        "--modules", default="children", help="children, leaves, all, params, a name or a glob"
    )
    sizes.add_argument("--meta", action="store_true", help="build the model on the meta device")
    sizes.add_argument("--device", default="cpu", help="run the model there: cpu (default), cuda, cuda:1")
    sizes.add_argument("--format", choices=("text", "json"), default="text")
    health = commands.add_parser("health", help="run random batches and check activation health")
    health.add_argument("factory", help=_FACTORY_HELP)
    health.add_argument("--input-size", required=True, help="full input shape, batch included: 16,3,64,64")
    health.add_argument("--batches", type=int, default=3, help="forward passes to record (default 3)")
    health.add_argument(
        "--train", action="store_true", help="train mode, a backward per batch, gradients too"
    )
    health.add_argument("--modules", default="params", help="params (default), all, leaves, a name or a glob")
    health.add_argument("--std", help="std bounds low,high")
    health.add_argument("--max-dead", type=float, help="max fraction of channels never active")
    health.add_argument("--max-near-zero", type=float, help="max fraction of values near zero")
    health.add_argument("--max-std-growth", type=float, help="max std ratio between consecutive layers")
    health.add_argument("--max-grad-norm", type=float, help="max gradient norm per parameter (--train)")
    health.add_argument("--min-grad-norm", type=float, help="min gradient norm per parameter (--train)")
    health.add_argument(
        "--plot",
        metavar="DIR",
        help="write DIR/activations.png (and with --train DIR/gradients.png); needs matplotlib",
    )
    health.add_argument("--seed", type=int, default=0, help="seed of the random batches")
    health.add_argument("--device", default="cpu", help="run the model there: cpu (default), cuda, cuda:1")
    health.add_argument("--format", choices=("text", "json"), default="text")
    leaks = commands.add_parser(
        "leaks", help="check that samples do not leak into each other (and, with --causal, no look-ahead)"
    )
    leaks.add_argument("factory", help=_FACTORY_HELP)
    leaks.add_argument("--input-size", required=True, help="full input shape, batch of 2 or more: 3,16")
    leaks.add_argument("--causal", action="store_true", help="also check that no position sees later ones")
    leaks.add_argument("--samples", help="the output samples to trace (default: the first and the last)")
    leaks.add_argument("--positions", help="the output positions to trace with --causal (default: up to 8)")
    leaks.add_argument("--output", help="the output to check: a key or attribute such as logits")
    leaks.add_argument("--train", action="store_true", help="keep the modules' train/eval modes")
    leaks.add_argument("--seed", type=int, default=0, help="seed of the random batch")
    leaks.add_argument("--device", default="cpu", help="run the model there: cpu (default), cuda, cuda:1")
    leaks.add_argument("--format", choices=("text", "json"), default="text")
    return parser


def run(prog: str = "python -m pytest_modelhooks") -> None:
    """The command line as a program: :func:`main`, exiting with its status."""
    raise SystemExit(main(prog=prog))


def script() -> None:
    """The ``modelhooks`` console script (its usage lines say ``modelhooks``)."""
    run("modelhooks")


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m pytest_modelhooks") -> int:
    """Run the command line; returns the exit status (2 for usage errors)."""
    parser = _parser(prog)
    args = parser.parse_args(argv)
    from pytest_modelhooks.snapshot import snapshot_text

    try:
        meta = getattr(args, "meta", False)
        args.device = _device(args.device, meta)
        model = _load(args.factory, meta)
        if args.device.type != "cpu":
            model = model.to(args.device)
        if args.command == "health":
            return _health(model, args)
        if args.command == "leaks":
            return _leaks(model, args)
        if args.command == "summary":
            from pytest_modelhooks.summary import model_summary

            if args.depth is not None and args.depth < 0:
                raise UsageError(f"--depth {args.depth}: must be >= 0")
            input_size = _shape(args.input_size, "--input-size") if args.input_size else None
            result = model_summary(model, input_size, depth=args.depth)
            if args.format == "json":
                print(json.dumps(result.to_dict(), indent=2))
            elif args.format == "markdown":
                print(result.to_markdown())
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
