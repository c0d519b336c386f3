"""Will it export: ``torch.export`` (or ONNX) of the model on the user's inputs, a failure named
at the module and the line of the model's code that caused it, and the exported program's
outputs compared with eager ones, leaf by leaf, at the given size and, with dynamic shapes, at
a second one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import re
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from pytest_modelhooks._torch import symbolic_input_sizes
from pytest_modelhooks._tree import default_tolerances, map_tensors, tensor_leaves
from pytest_modelhooks.compile.places import (
    Spans,
    frames_in_text,
    in_model,
    layer_label,
    model_kept,
    placed,
    readable_reason,
    spans,
    where,
)
from pytest_modelhooks.compile.recompiles import describe_call
from pytest_modelhooks.errors import describe
from pytest_modelhooks.findings import Finding, HealthError, format_findings
from pytest_modelhooks.inputs import check_model, forward_parameter_names, with_forward_kwargs
from pytest_modelhooks.tracing.state import rng_kept

__all__ = ["FORMATS", "check_exportable", "export_problems"]

#: what ``to=`` takes
FORMATS = ("torch", "onnx")
#: what ``to="onnx"`` needs, by import name and PyPI name
_ONNX_NEEDS = (("onnx", "onnx"), ("onnxscript", "onnxscript"), ("onnxruntime", "onnxruntime"))
#: loggers that print the partial graph and long debugging advice when an export fails
_NOISY = (
    "torch.export",
    "torch._export",
    "torch._dynamo",
    "torch._guards",
    "torch.__trace",
    "torch.fx.experimental.symbolic_shapes",
    "torch.onnx",
    "onnxscript",
)
# torch.export's words for a value its pytree cannot flatten (a transformers cache, a custom class)
_UNKNOWN_TYPE = re.compile(r"Found <class '([\w.]+)'> in (output|input)s?, which is not a known type")
_DATA_DEPENDENT = re.compile(r"Could not guard on data-dependent expression (.+?) \(unhinted")


@contextmanager
def _quiet() -> Iterator[None]:
    levels = {name: logging.getLogger(name).level for name in _NOISY}
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _check_format(to: Any) -> None:
    if to not in FORMATS:
        raise ValueError(f"to must be one of {', '.join(map(repr, FORMATS))}, got to={to!r}")
    if to == "onnx":
        absent = [package for module, package in _ONNX_NEEDS if importlib.util.find_spec(module) is None]
        if absent:
            raise ImportError(
                f"to='onnx' needs {', '.join(absent)}, not installed here: "
                "pip install 'pytest-modelhooks[onnx]' (onnx, onnxscript, onnxruntime)"
            )


def _dynamic_shapes(
    model: nn.Module, dynamic_shapes: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``dynamic_shapes`` as torch.export takes it, ``"batch"`` spelt out (the first size of
    every tensor input, one dimension for all), after checking it names the given inputs."""
    if dynamic_shapes is None:
        return None
    names = forward_parameter_names(model)
    if dynamic_shapes == "batch":
        batch = torch.export.Dim("batch")
        small = [
            path
            for path, tensor in tensor_leaves((args, kwargs))
            if tensor.dim() >= 1 and tensor.shape[0] < 2
        ]
        if small:
            raise ValueError(
                "dynamic_shapes='batch' needs a batch of 2 or more: torch.export makes sizes 0 and 1 "
                f"static, and the inputs have {describe_call(model, args, kwargs)}"
            )

        def first(value: Any) -> Any:
            return {0: batch} if isinstance(value, torch.Tensor) and value.dim() >= 1 else None

        shapes = {
            names[index] if index < len(names) else index: first(value) for index, value in enumerate(args)
        }
        shapes.update({key: first(value) for key, value in kwargs.items()})
        if len(names) >= len(args):
            return shapes
        return (*(first(value) for value in args),)
    if isinstance(dynamic_shapes, Mapping):
        given = [*names[: len(args)], *kwargs]
        unknown = [key for key in dynamic_shapes if key not in given]
        if unknown:
            raise ValueError(
                f"dynamic_shapes names {', '.join(map(repr, unknown))}, which is no input given to "
                f"{type(model).__name__}.forward (inputs given: {', '.join(map(repr, given)) or 'none'})"
            )
        return dynamic_shapes
    if isinstance(dynamic_shapes, (tuple, list)):
        if len(dynamic_shapes) != len(args) + len(kwargs):
            raise ValueError(
                f"dynamic_shapes has {len(dynamic_shapes)} entries for {len(args) + len(kwargs)} input(s) "
                f"({describe_call(model, args, kwargs)})"
            )
        return dynamic_shapes
    raise ValueError(
        "dynamic_shapes must be None, 'batch', a dict from the forward's input names or a tuple in "
        f"the inputs' order, got dynamic_shapes={describe(dynamic_shapes)}"
    )


def _tolerances(tensor: torch.Tensor, rtol: float | None, atol: float | None) -> tuple[float, float]:
    default_rtol, default_atol = default_tolerances(tensor.dtype)
    return (default_rtol if rtol is None else rtol), (default_atol if atol is None else atol)


def _compare(
    expected: Any, actual: Any, rtol: float | None, atol: float | None, what: str, shapes: str
) -> list[Finding]:
    """Leaf by leaf: a leaf missing, added, of another shape or dtype, or beyond tolerance."""
    want = dict(tensor_leaves(expected, "output"))
    got = dict(actual) if isinstance(actual, _Flat) else dict(tensor_leaves(actual, "output"))
    found = []
    for path in [*want, *(path for path in got if path not in want)]:
        if path not in got or path not in want:
            side = "lacks" if path not in got else "adds"
            note = f"the {what} {side} the output {path} of eager at {shapes}"
            found.append(Finding(path, "output", "structure", float("nan"), "as eager", None, note))
            continue
        one, other = want[path], got[path]
        if one.shape != other.shape or one.dtype != other.dtype:
            note = (
                f"the {what} gives {tuple(other.shape)} {other.dtype} at {shapes}, eager "
                f"{tuple(one.shape)} {one.dtype}"
            )
            found.append(Finding(path, "output", "shape", float("nan"), "as eager", None, note))
            continue
        if one.numel() == 0 or one.dtype == torch.bool or not (one.is_floating_point() or one.is_complex()):
            if not torch.equal(one.cpu(), other.cpu()):
                note = f"the {what} differs from eager at {shapes} (exact values expected)"
                found.append(Finding(path, "output", "mismatch", float("nan"), "equal", None, note))
            continue
        relative, absolute = _tolerances(one, rtol, atol)
        a, b = one.detach().double().cpu(), other.detach().double().cpu()
        difference = (a - b).abs()
        both_nan = a.isnan() & b.isnan()
        difference = torch.where(both_nan, torch.zeros_like(difference), difference)
        allowed = absolute + relative * a.abs()
        bad = ~(difference <= allowed)  # NaN on one side only: bad
        if bad.any():
            worst = difference.nan_to_num(float("inf")).max()
            index = tuple(int(i) for i in torch.nonzero(bad)[0])
            note = (
                f"the {what} differs from eager at {shapes}: {int(bad.sum())} of {a.numel()} values "
                f"beyond tolerance, first at {index} ({float(a[index]):.6g} vs {float(b[index]):.6g}), "
                f"mean |diff| {float(difference.nan_to_num(0).mean()):.3g}"
            )
            bound = f"<= {absolute:g} + {relative:g}*|eager|"
            found.append(Finding(path, "output", "max |diff|", float(worst), bound, None, note))
    return found


def _frames(error: BaseException) -> list[Any]:
    """The user frames of an export failure: dynamo's (strict) or the traceback's (non-strict,
    where the forward runs as Python on fake tensors), from the error or what caused it."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for one in chain:
        stack = getattr(one, "real_stack", None)
        if stack:
            return list(stack)
    for one in reversed(chain):
        frames = traceback.extract_tb(one.__traceback__)
        if frames:
            return list(frames)
    return []


def _export_reason(error: BaseException) -> tuple[str, str]:
    text = str(error)
    data_dependent = _DATA_DEPENDENT.search(text)
    if data_dependent:
        sentence = (
            f"a Python branch or size check on a data-dependent value ({data_dependent[1]}): export "
            "cannot tell which way it goes"
        )
        hint = "torch._check(...) states what holds; torch.cond expresses a branch"
        return sentence, hint
    unknown = _UNKNOWN_TYPE.search(text)
    if unknown:
        module, _, name = unknown[1].rpartition(".")
        sentence = f"the {unknown[2]} holds a {module}.{name}, which torch.export cannot take apart"
        hint = (
            "register the class as a pytree node (torch.export.register_dataclass for a dataclass, "
            "torch.utils._pytree.register_pytree_node otherwise)"
        )
        if module.startswith("transformers."):
            hint = "a transformers model returns its key/value cache there: pass use_cache=False"
        return sentence, hint
    if "Constraints violated" in text:  # torch's ConstraintViolationError, or export's UserError around it
        bullet = next((line.strip(" -") for line in text.splitlines() if line.strip().startswith("- ")), "")
        return (bullet.split(". If you", 1)[0] or "a dynamic size was specialised"), (
            "leave that dimension static, or compute with the size as a tensor"
        )
    sentence, hint = readable_reason(
        text.replace("Consider annotating your code using torch._check*(). ", "")
    )
    return f"{type(error).__name__}: {sentence}"[:400], hint


def _failure(model: nn.Module, error: BaseException, classes: Spans, what: str, retry: Any) -> Finding:
    """A failed export as a finding at the module whose code failed. A size specialised under
    non-strict export comes without a stack; ``retry()`` (a strict export, traced by dynamo)
    says where."""
    frames = [frame for frame in _frames(error) if frame.filename]
    inside = [frame for frame in frames if in_model(frame.filename, frame.lineno, classes)]
    if not inside:
        frames = frames_in_text(str(error))
        if not any(in_model(frame.filename, frame.lineno, classes) for frame in frames) and retry is not None:
            try:
                retry()
            except Exception as again:
                frames = frames_in_text(str(again)) or frames
        inside = [frame for frame in frames if in_model(frame.filename, frame.lineno, classes)]
    names = placed(model, inside, classes)
    sentence, hint = _export_reason(error)
    location = ""
    if inside:
        last = inside[-1]
        location = f"{where(last.filename, last.lineno)} `{(last.line or '').strip()}`: "
    module = model.get_submodule(names[0]) if names[0] else model
    statistic = "specialized" if "Constraints violated" in str(error) else "not exportable"
    note = f"{what} failed: {location}{sentence}" + (f" (hint: {hint})" if hint else "")
    return Finding(layer_label(names), type(module).__name__, statistic, float("nan"), "exports", None, note)


def _run(function: Any, args: tuple[Any, ...], kwargs: dict[str, Any], model: nn.Module) -> Any:
    # the same random draws for the eager and the exported run (dropout in training mode)
    with model_kept(model), rng_kept(model, seed=0), torch.no_grad():
        return function(*args, **kwargs)


def _second_size(program: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    """New inputs at other values of the program's dynamic sizes (each twice its value, within
    its range): None where no size is dynamic. Each symbol's value is read where it stands alone;
    derived sizes (``2*s0``) follow."""
    sizes = symbolic_input_sizes(program)
    leaves = [tensor for _, tensor in tensor_leaves((args, kwargs))]
    if len(sizes) != len(leaves) or all(isinstance(size, int) for dims in sizes for size in dims):
        return None
    values: dict[Any, int] = {}
    for dims, tensor in zip(sizes, leaves, strict=True):
        for size, actual in zip(dims, tensor.shape, strict=True):
            if getattr(size, "is_Symbol", False):  # a sympy symbol standing alone
                values[size] = int(actual)
    chosen = {}
    for symbol, value in values.items():
        bounds = program.range_constraints.get(symbol)
        upper = getattr(bounds, "upper", None)
        try:
            highest = None if upper is None else int(upper)
        except (TypeError, ValueError, AttributeError, OverflowError):  # an infinite bound
            highest = None
        new = max(2 * value, 2)
        if highest is not None and new > highest:
            new = value + 1 if value + 1 <= highest else value
        chosen[symbol] = new
    replaced = {}
    for dims, tensor in zip(sizes, leaves, strict=True):
        shape = [int(size.subs(chosen)) if not isinstance(size, int) else size for size in dims]
        replaced[id(tensor)] = _like(tensor, shape)

    def swap(tensor: torch.Tensor) -> torch.Tensor:
        return replaced.get(id(tensor), tensor)

    return map_tensors(args, swap), map_tensors(kwargs, swap)


def _like(tensor: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """A random tensor of another shape with the dtype, device and value range of ``tensor``."""
    generator = torch.Generator().manual_seed(1)
    if tensor.dtype == torch.bool:
        made = torch.rand(shape, generator=generator) > 0.5
    elif tensor.is_floating_point():
        made = torch.randn(shape, generator=generator).to(tensor.dtype)
    else:
        low = int(tensor.min()) if tensor.numel() else 0
        high = int(tensor.max()) + 1 if tensor.numel() else 1
        made = torch.randint(low, high, shape, generator=generator, dtype=tensor.dtype)
    return made.to(tensor.device)


def export_problems(
    model: nn.Module,
    *inputs: Any,
    dynamic_shapes: Any = None,
    strict: bool = False,
    to: str = "torch",
    rtol: float | None = None,
    atol: float | None = None,
    **forward_kwargs: Any,
) -> list[Finding]:
    """What goes wrong exporting ``model`` on ``model(*inputs, **forward_kwargs)``, as
    :class:`~pytest_modelhooks.findings.Finding` rows (empty: it exports and agrees with eager).

    ``to="torch"`` runs ``torch.export.export(model, inputs, dynamic_shapes=..., strict=...)``;
    ``to="onnx"`` the dynamo ONNX exporter, compared through onnxruntime (the ``onnx`` extra).
    A failed export is one ``"not exportable"`` row (``"specialized"`` where a dynamic size
    was made static) at the module whose code failed, with the file and line, the reason in
    a sentence and a hint. An export that works is run on the same inputs and compared with
    eager output by output (``max |diff|``, ``shape``, ``structure``), within ``rtol``/``atol``
    (default: ``torch.testing.assert_close``'s for each dtype); with ``dynamic_shapes``
    (torch.export's, or ``"batch"``: the first size of every input), once more at twice each
    dynamic size. Both runs draw the same random numbers (dropout in training mode); buffers,
    Python-side state and the RNG are put back.

    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    >>> export_problems(net, torch.randn(2, 4), dynamic_shapes="batch")
    []
    """
    model = check_model(model)
    _check_format(to)
    # export draws random numbers of its own: the user's RNG state is put back after
    with rng_kept(model):
        return _problems(model, inputs, dynamic_shapes, strict, to, rtol, atol, forward_kwargs)


def _problems(
    model: nn.Module,
    inputs: tuple[Any, ...],
    dynamic_shapes: Any,
    strict: bool,
    to: str,
    rtol: float | None,
    atol: float | None,
    forward_kwargs: dict[str, Any],
) -> list[Finding]:
    args, kwargs = with_forward_kwargs(model, tuple(inputs), {}, forward_kwargs, "export_problems")
    shapes = _dynamic_shapes(model, dynamic_shapes, args, kwargs)
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and not (isinstance(value, (int, float)) and value >= 0):
            raise ValueError(f"{name} must be a non-negative number or None, got {name}={value!r}")
    try:
        expected = _run(model, args, kwargs, model)
    except Exception as error:
        raise ValueError(
            f"inputs ({describe_call(model, args, kwargs)}) do not fit {type(model).__name__}.forward: "
            f"{type(error).__name__}: {error}"
        ) from error
    classes = spans(model)
    what = "torch.export" if to == "torch" else "the ONNX export"
    with model_kept(model), _quiet():
        try:
            # a failing torch.export prints the partial graph to stderr: the finding says it better
            with contextlib.redirect_stderr(io.StringIO()):
                program = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=strict)
        except Exception as error:

            def strict_export() -> Any:
                with contextlib.redirect_stderr(io.StringIO()):
                    return torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=True)

            retry = strict_export if not strict and "Constraints violated" in str(error) else None
            return [_failure(model, error, classes, what, retry)]
    if to == "onnx" and (training := _training_dependent(model)):
        # an ONNX model is for inference: dropout would drop there, batch norm use each batch's
        # statistics; and onnxruntime's random numbers are not torch's, so no comparison could pass
        shown = ", ".join(training[:3]) + (f" and {len(training) - 3} more" if len(training) > 3 else "")
        note = (
            f"the model is in training mode, so the ONNX model would hold {shown} as in training "
            "(hint: model.eval() before exporting for inference)"
        )
        return [Finding("", type(model).__name__, "training mode", float(len(training)), "eval", None, note)]
    if to == "onnx":
        try:
            with model_kept(model), _quiet():
                run = _onnx_runner(_onnx_export(program, args, kwargs), expected)
        except Exception as error:
            reason = " ".join(str(error).split())[:400]
            note = f"the ONNX conversion of the exported program failed: {type(error).__name__}: {reason}"
            return [Finding("", type(model).__name__, "not exportable", float("nan"), "exports", None, note)]
    else:
        try:
            run = program.module()
        except Exception as error:  # torch.export's own unlifting can fail (a submodule named "meta")
            reason = " ".join(str(error).split())[:400]
            note = f"the exported program does not make a module: ExportedProgram.module(): {reason}"
            return [Finding("", type(model).__name__, "run failed", float("nan"), "runs", None, note)]
    named = "exported program" if to == "torch" else "ONNX model (onnxruntime)"
    found = _compare_run(model, run, expected, args, kwargs, rtol, atol, named)
    if shapes is not None:
        second = _second_size(program, args, kwargs)
        if second is not None:
            more_args, more_kwargs = second
            expected = _run(model, more_args, more_kwargs, model)
            found += _compare_run(model, run, expected, more_args, more_kwargs, rtol, atol, named)
    return found


def _compare_run(
    model: nn.Module,
    run: Any,
    expected: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    rtol: float | None,
    atol: float | None,
    named: str,
) -> list[Finding]:
    shapes = describe_call(model, args, kwargs)
    try:
        actual = _run(run, args, kwargs, model)
    except Exception as error:
        reason = " ".join(str(error).split())[:300]
        note = f"the {named} fails at {shapes}: {type(error).__name__}: {reason}"
        return [Finding("", type(model).__name__, "run failed", float("nan"), "runs", None, note)]
    return _compare(expected, actual, rtol, atol, named, shapes)


def _training_dependent(model: nn.Module) -> list[str]:
    """The modules in training mode that behave differently in eval (dropout, batch norm)."""
    kinds = (
        nn.Dropout,
        nn.Dropout1d,
        nn.Dropout2d,
        nn.Dropout3d,
        nn.AlphaDropout,
        nn.FeatureAlphaDropout,
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.SyncBatchNorm,
    )
    return [
        f"{name or '(model)'} ({type(module).__name__})"
        for name, module in model.named_modules()
        if module.training and isinstance(module, kinds)
    ]


class _Flat(dict[str, torch.Tensor]):
    """Outputs already flat, by path (an ONNX model's)."""


def _onnx_export(program: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The exported program as ONNX, by torch's dynamo exporter (dynamic sizes as exported)."""
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return torch.onnx.export(program, args, kwargs=kwargs, dynamo=True, verbose=False, report=False)


def _onnx_runner(program: Any, expected: Any) -> Any:
    """The ONNX model run by onnxruntime, its flat outputs put back in eager's structure (the
    leaves in the same order), so that they compare by name."""
    paths = [path for path, _ in tensor_leaves(expected, "output")]

    def run(*args: Any, **kwargs: Any) -> Any:
        outputs = list(program(*args, **kwargs))
        if len(outputs) != len(paths):
            return _Flat(
                {f"output[{index}]": torch.as_tensor(tensor) for index, tensor in enumerate(outputs)}
            )
        return _Flat({path: torch.as_tensor(tensor) for path, tensor in zip(paths, outputs, strict=True)})

    return run


def check_exportable(
    model: nn.Module,
    *inputs: Any,
    dynamic_shapes: Any = None,
    strict: bool = False,
    to: str = "torch",
    rtol: float | None = None,
    atol: float | None = None,
    **forward_kwargs: Any,
) -> None:
    """Raise :class:`~pytest_modelhooks.findings.HealthError` when the model does not export,
    or its export disagrees with eager (:func:`export_problems`), with a row per problem.

    >>> check_exportable(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), torch.randn(2, 4))
    """
    __tracebackhide__ = True
    found = export_problems(
        model,
        *inputs,
        dynamic_shapes=dynamic_shapes,
        strict=strict,
        to=to,
        rtol=rtol,
        atol=atol,
        **forward_kwargs,
    )
    if found:
        what = "torch.export" if to == "torch" else "ONNX export"
        message = f"{what} check failed: {len(found)} problem(s)\n" + format_findings(found, unit="call")
        raise HealthError(message, found)
