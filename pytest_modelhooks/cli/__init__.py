"""Command line: summaries and layer sizes outside pytest.

    python -m pytest_modelhooks summary PACKAGE.MODULE:FACTORY --input-size 1,3,224,224 \\
        [--meta] [--depth N] [--format text|json|markdown]
    python -m pytest_modelhooks sizes PACKAGE.MODULE:FACTORY --size 64,64 [--modules leaves]
    python -m pytest_modelhooks health PACKAGE.MODULE:FACTORY --input-size 16,3,64,64 \\
        [--batches 3] [--train] [--std 0.2,5] [--max-dead 0.3] [--max-grad-norm 100]
    python -m pytest_modelhooks leaks PACKAGE.MODULE:FACTORY --input-size 3,16 [--causal]
    python -m pytest_modelhooks memory PACKAGE.MODULE:FACTORY --input-size 8,3,224,224 \\
        [--optimizer adamw] [--autocast bf16] [--budget 80GiB] [--max-batch] [--meta]
    python -m pytest_modelhooks compile PACKAGE.MODULE:FACTORY --input-size 2,3,64,64 \\
        [--input-size 5,3,64,64] [--dynamic batch] [--max-graph-breaks 0] [--export] [--onnx]
    python -m pytest_modelhooks state-dict PACKAGE.MODULE:FACTORY [--checkpoint old.pt] [--meta]
    python -m pytest_modelhooks diverge PACKAGE.MODULE:FACTORY --input-size 2,3,64,64 --against bf16
    python -m pytest_modelhooks learn PACKAGE.MODULE:FACTORY --input-size 8,3,64,64 \\
        [--loss cross-entropy|bce|mse] [--checks init,overfit,input] [--steps 500] [--lr 1e-3]

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
``leaks`` runs :func:`~pytest_modelhooks.dependence.reach.batch_leaks` (and with ``--causal``
:func:`~pytest_modelhooks.dependence.reach.causal_leaks`) on one random batch and exits with 1 when a
layer mixes samples or looks ahead. ``memory`` traces one training step on fake tensors and
prints its peak and what holds it per layer; with ``--budget`` it exits with 1 when the peak is
over it, with ``--max-batch`` it prints the largest batch that fits. ``compile`` lists
``torch.compile``'s graph breaks on one random batch, named at the module and the line (with
more sizes, the recompilations; with ``--export``/``--onnx``, the export problems), and exits
with 1 when there are more than ``--max-graph-breaks``. ``state-dict`` prints every key of the
state dict; with ``--checkpoint`` it exits with 1 when that checkpoint would not load as saved.
``diverge`` names the first module where the model and its ``--against`` run part, exit 1 when
they do. ``learn`` runs the training recipe's first checks on one random batch with random
targets shaped from the output (the loss at init is chance, a copy memorises the batch, the
output depends on the input), exit 1 when one fails. Without ``--input-size``, ``health``,
``leaks``, ``compile``, ``diverge`` and ``learn`` make a
batch shaped as the first layer that reads the input implies (as large as the image size the
model declares, or a larger standard size where its forward refuses the default one), and say
its shape on stderr.

Each subcommand is a module of this package (:mod:`.summary`, :mod:`.sizes`, :mod:`.health`,
:mod:`.leaks`, :mod:`.memory`, :mod:`.compile`, :mod:`.state_dict`, :mod:`.diverge`,
:mod:`.learn`) with the
same four names: ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(model, args) -> exit
status``; what they share is in :mod:`.common`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from pytest_modelhooks.cli import compile, diverge, health, leaks, learn, memory, sizes, state_dict, summary
from pytest_modelhooks.cli.common import (
    FACTORY_HELP,
    KWARG_HELP,
    SEED_HELP,
    UsageError,
    check_modules,
    load_factory,
    parse_device,
    parse_kwargs,
    parse_seed,
)
from pytest_modelhooks.errors import error_text

__all__ = ["main", "run", "script"]

#: The subcommands, in the order ``--help`` lists them.
SUBCOMMANDS: tuple[ModuleType, ...] = (
    summary,
    sizes,
    health,
    leaks,
    memory,
    compile,
    state_dict,
    diverge,
    learn,
)
#: Those that can build the model on the meta device (they never compute on its weights).
_META = (summary, sizes, memory, state_dict)


def _parser(prog: str = "python -m pytest_modelhooks") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        sub = commands.add_parser(command.NAME, help=command.HELP, description=command.__doc__)
        sub.add_argument("factory", help=FACTORY_HELP)
        command.add_arguments(sub)
        if command in _META:
            sub.add_argument("--meta", action="store_true", help="build the model on the meta device")
        sub.add_argument("--device", default="cpu", help="run the model there: cpu (default), cuda, cuda:1")
        sub.add_argument("--seed", default="0", help=SEED_HELP)
        sub.add_argument("--kwarg", action="append", metavar="NAME=VALUE", help=KWARG_HELP)
        sub.add_argument("--format", choices=command.FORMATS, default="text")
        # a usage error after parsing names the subcommand's usage, not the top-level one
        sub.set_defaults(run=command.run, usage=sub)
    return parser


def _seed_torch(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def run(prog: str = "python -m pytest_modelhooks") -> None:
    """The command line as a program: :func:`main`, exiting with its status."""
    raise SystemExit(main(prog=prog))


def script() -> None:
    """The ``modelhooks`` console script (its usage lines say ``modelhooks``)."""
    run("modelhooks")


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m pytest_modelhooks") -> int:
    """Run the command line; returns the exit status (2 for usage errors).

    >>> main(["sizes", "torch.nn:Linear(4, 8)"])
    Layer sizes
     (Linear)  (1, 8)
    0
    """
    parser = _parser(prog)
    args = parser.parse_args(argv)
    try:
        meta = getattr(args, "meta", False)
        args.device = parse_device(args.device, meta)
        args.seed = parse_seed(args.seed)
        args.kwargs = parse_kwargs(args.kwarg)
        _seed_torch(args.seed)  # before the factory: a random init is the same on every run
        model = load_factory(args.factory, meta)
        if args.device.type != "cpu":
            model = model.to(args.device)
        check_modules(model, getattr(args, "modules", None))
        if getattr(args, "exclude", None):
            args.exclude = args.exclude.split(",")
        check_modules(model, getattr(args, "exclude", None), "--exclude")
        status: int = args.run(model, args)
    except UsageError as error:
        args.usage.error(str(error))  # exits with status 2
    except (ValueError, TypeError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except AssertionError as error:  # a model's check of its input (nanoGPT's block size)
        print(f"error: {error_text(error, where=True)}", file=sys.stderr)
        return 1
    return status
