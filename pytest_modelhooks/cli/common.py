"""What every subcommand shares: loading the model factory, parsing shapes and devices, random
batches, naming the layer of a failed forward.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any


class UsageError(Exception):
    """A bad command line; the message names the argument."""


SEED_HELP = (
    "torch.manual_seed before the model is built, and the seed of the random batches: an integer "
    "(default 0: the same weights and verdict on every run) or 'random' (printed, to rerun with)"
)


def parse_seed(text: str) -> int:
    """``--seed``: an integer, or ``random`` (a new one, printed to stderr so that the run can be
    repeated)."""
    if text.strip().lower() == "random":
        import random

        seed = random.randrange(2**32)
        print(f"seed: {seed} (rerun with --seed {seed})", file=sys.stderr)
        return seed
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed < 2**64:
        raise UsageError(f"--seed {text!r}: expected an integer in [0, 2**64) or 'random'")
    return seed


def check_modules(model: Any, modules: str | list[str] | None, option: str = "--modules") -> None:
    """``--modules`` (or ``--exclude``), checked before anything runs: a name or glob that matches
    no module is the command line's mistake (exit 2), not the model's."""
    if modules is None:
        return
    from pytest_modelhooks.hooks.select import select_modules

    try:
        select_modules(model, modules, argument=option)
    except (ValueError, TypeError) as error:
        raise UsageError(str(error)) from None


def dumps(data: Any) -> str:
    """``data`` as indented JSON, with each list of numbers (a shape) on one line.

    >>> print(dumps({"calls": [[1, 8, 14, 14]]}))
    {
      "calls": [
        [1, 8, 14, 14]
      ]
    }
    """
    text = json.dumps(data, indent=2, default=str)
    return _NUMBER_LIST.sub(_one_line, text)


def _one_line(match: re.Match[str]) -> str:
    return "[" + ", ".join(part.strip() for part in match.group(1).split(",")) + "]"


# a JSON list holding numbers (or nulls: a ragged dimension) only, spread over lines by indent=2
_NUMBER_LIST = re.compile(
    r"\[((?:\s*(?:-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|null)\s*,)*\s*(?:-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|null)\s*)\]"
)


#: How the shape options read, in their help.
SHAPE_FORMS = "comma-separated, such as 1,3,224,224 (or 1x3x224x224)"


def parse_shape(text: str, argument: str) -> tuple[int, ...]:
    """``1,3,224,224`` or ``1x3x224x224``; every part a positive integer."""
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


def load_factory(path: str, meta: bool) -> Any:
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


KWARG_HELP = (
    "a keyword argument for the model's forward, NAME=VALUE with a Python literal value "
    "(targets=None, use_cache=False); repeat for several"
)


def parse_kwargs(items: list[str] | None) -> dict[str, Any]:
    """``--kwarg NAME=VALUE`` options as the forward's keyword arguments (literals only).

    >>> parse_kwargs(["targets=None", "scale=0.5"])
    {'targets': None, 'scale': 0.5}
    """
    found: dict[str, Any] = {}
    for item in items or []:
        name, equals, text = item.partition("=")
        if not equals or not name.isidentifier():
            raise UsageError(f"--kwarg {item!r}: expected NAME=VALUE, such as targets=None")
        try:
            found[name] = ast.literal_eval(text)
        except (SyntaxError, ValueError):
            raise UsageError(
                f"--kwarg {item!r}: the value must be a Python literal (None, 3, 'text', [1, 2])"
            ) from None
    return found


def default_input_size(
    model: Any, batches: Sequence[int], command: str, kwargs: Mapping[str, Any] | None = None
) -> str:
    """``--input-size`` where none is given: the shape of the dummy batch the first layer that
    reads the input implies (``dummy_batch``; larger where the model declares its image size,
    or its forward, traced on stand-ins, refuses the default one), with the first of
    ``batches`` that no other dimension has as its batch size (a leak is then told apart from a
    channel). Says so on stderr, so that a snapshot or JSON on stdout stays as it is."""
    from pytest_modelhooks.inputs import batch_for, input_spec
    from pytest_modelhooks.tracing.dummy import fitting_spec

    try:
        input_spec(model)  # (a model that says nothing of its input: the reason, as a usage error)
    except ValueError as error:
        reason = str(error).split(";")[0]  # (the rest names the library's arguments)
        raise UsageError(f"--input-size is needed: {reason}") from None
    spec = fitting_spec(model, kwargs)
    shape = list(batch_for(model, spec, None).shape)
    at = default_batch_dim(model)
    others = shape[:at] + shape[at + 1 :]
    shape[at] = next((size for size in batches if size not in others), batches[0])
    size = ",".join(map(str, shape))
    source = f", {spec.size_from}" if spec.size_from else ""
    print(
        f"modelhooks {command}: no --input-size given; a batch of {size} from {spec.described}{source}",
        file=sys.stderr,
    )
    return size


def add_decoder_inputs(model: Any, args: Any, batch: int, command: str) -> None:
    """Give an encoder-decoder (T5, BART, Whisper), which refuses to run without them, 8 seeded
    decoder ids per sample in ``args.kwargs`` where ``--kwarg`` gives its decoder nothing;
    says so on stderr."""
    ids = decoder_ids(model, args.kwargs, batch, args.seed, args.device)
    if ids is None:
        return
    args.kwargs = {**args.kwargs, "decoder_input_ids": ids}
    print(
        f"modelhooks {command}: decoder_input_ids of {batch},8 for the encoder-decoder's decoder",
        file=sys.stderr,
    )


def decoder_ids(model: Any, kwargs: Mapping[str, Any], batch: int, seed: int, device: Any) -> Any:
    """The 8 seeded decoder ids per sample :func:`add_decoder_inputs` gives a batch of
    ``batch``, or None where the model needs none (no encoder-decoder, or ``kwargs``, the
    ``--kwarg``s, give its decoder an input)."""
    import torch

    from pytest_modelhooks.inputs import decoder_inputs

    if not decoder_inputs(model, kwargs):
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, 8), generator=generator).to(device)


def default_batch_dim(model: Any) -> int:
    """Where the batch is in the input :func:`default_input_size` makes: second for an RNN or
    attention without ``batch_first``, first otherwise."""
    from pytest_modelhooks.inputs import input_spec

    spec = input_spec(model)
    return 1 if spec.layout == "sequence" and not spec.batch_first else 0


def random_batch(model: Any, shape: tuple[int, ...], seed: int, device: Any) -> Any:
    import torch

    from pytest_modelhooks.inputs import input_spec

    # made on the CPU from a seeded generator: the same batch on every device
    generator = torch.Generator().manual_seed(seed)
    try:
        spec = input_spec(model)
    except ValueError:
        spec = None
    if spec is not None and spec.layout == "tokens":
        return torch.randint(0, spec.channels, shape, generator=generator).to(device)
    return torch.randn(shape, generator=generator).to(device)


def parse_device(text: str, meta: bool) -> Any:
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


def raise_naming_the_layer(model: Any, inputs: Any) -> None:
    """After a failed forward: the same forward traced (on meta stand-ins where it can), so
    that the error names the layer and the shape it got, as ``summary`` does."""
    from pytest_modelhooks.errors import LayerError
    from pytest_modelhooks.tracing.engines import trace_model

    try:
        trace_model(model, (inputs,))
    except LayerError as error:
        raise error from None
    except Exception:  # the trace failed some other way: the original error says more
        return


def parse_indices(text: str, argument: str) -> tuple[int, ...]:
    """Comma-separated non-negative integers (indices)."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or any(value < 0 for value in values):
        raise UsageError(f"{argument} {text!r}: expected comma-separated indices, such as 0,2")
    return values


FACTORY_HELP = "PACKAGE.MODULE:FACTORY, or 'PACKAGE.MODULE:FACTORY(depth=50, ...)' with literal arguments"
