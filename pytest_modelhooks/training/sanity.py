"""The first checks of the standard training recipe: the loss at initialisation is what chance
gives (``log(num_classes)`` for a classifier), and the output depends on every input (and, for
token models, on every position).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pytest_modelhooks._tree import tensor_leaves
from pytest_modelhooks.dependence.calls import OutputSpec, select_output
from pytest_modelhooks.errors import describe
from pytest_modelhooks.findings import Finding, HealthError, format_findings
from pytest_modelhooks.hooks.state import preserve_training_flags
from pytest_modelhooks.inputs import (
    check_model,
    forward_parameter_names,
    normalise_input,
    with_forward_kwargs,
)
from pytest_modelhooks.tracing.state import buffers_kept, rng_kept, untrained_batch_norms

__all__ = ["check_loss_at_init", "check_uses_input", "input_use", "scalar_loss", "split_batch"]

LossFn = Callable[[Any, Any], torch.Tensor]


def split_batch(model: nn.Module, batch: Any, caller: str) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
    """``batch`` as ``(input, target)``: the input normalised to the forward's arguments."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(
            f"{caller}: batch must be an (input, target) pair, got {describe(batch)}; the input is a "
            "tensor, a tuple of positional inputs or a dict of keyword inputs"
        )
    args, kwargs = normalise_input(batch[0], "batch[0]", model)
    return args, kwargs, batch[1]


def _known_loss(loss_fn: LossFn) -> str | None:
    """``"cross_entropy"`` or ``"bce"`` for the losses whose chance value is known, else None."""
    if loss_fn is nn.functional.cross_entropy or isinstance(loss_fn, nn.CrossEntropyLoss):
        return "cross_entropy"
    if loss_fn is nn.functional.binary_cross_entropy_with_logits or isinstance(loss_fn, nn.BCEWithLogitsLoss):
        return "bce"
    return None


def loss_input(output: Any, spec: OutputSpec, loss_fn: LossFn, caller: str) -> Any:
    """What ``loss_fn`` is given of the model's ``output``: the part ``spec`` selects (a key,
    attribute, position or callable); by default, for a known loss (cross-entropy, BCE with
    logits), the logits: the output itself when a tensor, else its ``logits`` field (a
    transformers ``ModelOutput``, a dict) or its first element (nanoGPT's ``(logits, loss)``);
    any other ``loss_fn`` gets the output as it is."""
    if spec is not None:
        return select_output(output, spec, "output")
    if _known_loss(loss_fn) is None or isinstance(output, torch.Tensor):
        return output
    field = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(field, torch.Tensor):
        return field
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"{caller}: the model returned a {type(output).__name__}, not a tensor of logits; pick them "
        f"with output= (a key, attribute, position or callable), or pass a loss_fn that takes the "
        f"output as it is"
    )


def classes_last(loss_fn: LossFn, logits: Any, target: Any) -> bool:
    """Whether a cross-entropy's ``logits`` hold their classes in the last dimension, as a
    language model's ``(batch, length, vocab)`` do against ``(batch, length)`` targets (torch's
    own layout, classes second, wins where both fit)."""
    return (
        _known_loss(loss_fn) == "cross_entropy"
        and isinstance(logits, torch.Tensor)
        and isinstance(target, torch.Tensor)
        and logits.dim() >= 3
        and not target.is_floating_point()
        and target.shape == logits.shape[:-1]
        and target.shape != (logits.shape[0], *logits.shape[2:])
    )


def scalar_loss(
    loss_fn: LossFn, output: Any, target: Any, caller: str, spec: OutputSpec = None
) -> torch.Tensor:
    """The loss of ``output`` (the part :func:`loss_input` gives ``loss_fn``) against
    ``target``, refused unless a finite-or-not scalar tensor."""
    return loss_of(loss_fn, loss_input(output, spec, loss_fn, caller), target, caller)


def loss_of(loss_fn: LossFn, given: Any, target: Any, caller: str) -> torch.Tensor:
    """:func:`scalar_loss` of what :func:`loss_input` gave."""
    try:
        if classes_last(loss_fn, given, target):
            loss = loss_fn(given.flatten(0, -2), target.flatten())
        else:
            loss = loss_fn(given, target)
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        # torch's words ("Target 12 is out of bounds") name neither side: say what met what
        raise ValueError(
            f"{caller}: loss_fn failed on the output {_described(given)} and the target "
            f"{_described(target)}: {type(error).__name__}: {error}"
        ) from error
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else describe(loss)
        raise ValueError(
            f"{caller}: loss_fn must return a scalar tensor, got {shape}; reduce it (reduction='mean')"
        )
    return loss.reshape(())


def _described(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    return describe(value)


def _chance(loss_fn: LossFn, output: torch.Tensor, last: bool) -> tuple[float, float, str] | None:
    """For the losses whose value at chance is known: that value, the loss these logits give
    averaged over every label (so a small batch's labels add no noise: log-sum-exp minus the
    mean logit for cross-entropy), and what the value is. None for other losses. ``last``:
    the classes are the last dimension (:func:`classes_last`)."""
    logits = output.detach().double()
    kind = _known_loss(loss_fn)
    if kind == "cross_entropy":
        dim = logits.dim() - 1 if last or logits.dim() <= 2 else 1
        classes = logits.shape[dim]
        averaged = (torch.logsumexp(logits, dim) - logits.mean(dim)).mean()
        return math.log(classes), float(averaged), f"log({classes} classes)"
    if kind == "bce":
        averaged = (nn.functional.softplus(logits) - logits / 2).mean()
        return math.log(2.0), float(averaged), "log(2), logits at 0"
    return None


def _spread(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() and tensor.numel() > 1


def _loudest_layer(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: OutputSpec, loss_fn: LossFn
) -> str:
    """The layer with parameters whose output std grows most over its input's (where an init
    made the logits large: a head scaled up, a residual branch not scaled down), and the layer
    whose output the logits are, with its weights' scale against the default init's for its
    fan-in: a head drawn at a fixed std (Inception-v3's 0.1 over 2,048 inputs) or tied to an
    embedding drawn at N(0, 1) starts far from chance."""
    growth: list[tuple[float, str, float]] = []
    outputs: dict[str, weakref.ref[torch.Tensor]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            before = [
                t.float().std() for _, t in tensor_leaves(inputs) if t.is_floating_point() and t.numel() > 1
            ]
            after = [
                t.float().std() for _, t in tensor_leaves(output) if t.is_floating_point() and t.numel() > 1
            ]
            if isinstance(output, torch.Tensor):
                outputs[name] = weakref.ref(output)  # a weak one: the forward's memory stays its own
            if after:
                out = float(after[0])
                ratio = out / float(before[0]) if before and float(before[0]) > 0 else out
                growth.append((ratio, name, out))

        return hook

    handles = [
        module.register_forward_hook(record(name))
        for name, module in model.named_modules()
        if name and any(True for _ in module.parameters(recurse=False))
    ]
    try:
        with torch.no_grad():
            logits = loss_input(model(*args, **kwargs), output, loss_fn, "check_loss_at_init")
    finally:
        for handle in handles:
            handle.remove()
    if not growth:
        return ""
    ratio, name, std = max(growth)
    kind = type(model.get_submodule(name)).__name__
    head = next((key for key, ref in reversed(outputs.items()) if ref() is logits), None)
    if head is None or head == name:
        return (
            f", and layer {name} ({_scaled(model, name)}) multiplies its input's std by {ratio:.3g} "
            f"(output std {std:.3g})"
        )
    return (
        f", from layer {head} ({_scaled(model, head)}), and layer {name} ({kind}) multiplies its "
        f"input's std by {ratio:.3g} (output std {std:.3g})"
    )


# the layers whose reset_parameters draws weights at 1/sqrt(3 * fan_in) (kaiming_uniform_, a=sqrt(5))
_DEFAULT_INIT = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def _scaled(model: nn.Module, name: str) -> str:
    """A layer's type, and for one with a weight matrix or kernel, that weight's std against
    the default init's (a Linear's or Conv's: ``1/sqrt(3 * fan_in)``, so "10x" is a head
    scaled up tenfold), or else against ``1/sqrt(fan_in)``."""
    module = model.get_submodule(name)
    kind = type(module).__name__
    weight = getattr(module, "weight", None)
    if not (isinstance(weight, torch.Tensor) and weight.dim() >= 2 and weight.is_floating_point()):
        return kind
    fan_in = weight[0].numel()
    std = float(weight.detach().float().std()) if weight.numel() > 1 else 0.0
    # a head tied to an embedding has the embedding's init (nn.Embedding's: N(0, 1))
    owners = [
        other
        for other, held in model.named_modules()
        if other != name and dict(held.named_parameters(recurse=False)).get("weight") is weight
    ]
    tie = f", tied to {owners[0]}.weight ({type(model.get_submodule(owners[0])).__name__})" if owners else ""
    if isinstance(module, _DEFAULT_INIT):
        times = std * math.sqrt(3 * fan_in)
        return f"{kind}, weight std {std:.3g}: {times:.3g}x PyTorch's default for fan_in {fan_in}{tie}"
    return f"{kind}, weight std {std:.3g} = {std * math.sqrt(fan_in):.3g}/sqrt(fan_in {fan_in}){tie}"


def check_loss_at_init(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn = nn.functional.cross_entropy,
    *,
    expected: float | None = None,
    rtol: float = 0.15,
    output: OutputSpec = None,
    seed: int = 0,
    **forward_kwargs: Any,
) -> float:
    """Raise :class:`~pytest_modelhooks.findings.HealthError` when the loss of the untrained
    model on ``batch`` (an ``(input, target)`` pair) is not within ``rtol`` of ``expected``:
    by default the loss of chance, ``log(num_classes)`` for cross-entropy, ``log 2`` for BCE
    with logits, judged on the loss the logits give averaged over every label (a batch of a
    few samples has noisy labels, not noisy logits). A loss far above it means confident wrong
    predictions at init; the message names the output's scale (the logits' std), the layer
    whose output the logits are with its weights' std against PyTorch's default for its fan-in
    (and the module its weight is tied to), and the layer with parameters that scaled its input
    most. Runs in the model's own mode (as the first training step would), under
    ``torch.no_grad``; buffers (batch norm's statistics) and the RNG are put back. Returns the
    loss. The default ``rtol`` holds for torchvision's classifiers at their default init but
    Inception-v3's (its head's weights are drawn at std 0.1, 7.8x the default for 2,048
    inputs); a head with two classes may need more.

    The two known losses get the output's logits (:func:`loss_input`: a transformers model's
    ``.logits``, a tuple's first tensor; ``output=`` picks another part), and cross-entropy
    takes a language model's ``(batch, length, vocab)`` logits against ``(batch, length)``
    targets as they are, so ``check_loss_at_init(lm, (ids[:, :-1], ids[:, 1:]))`` judges the
    loss against ``log(vocab)``.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    >>> round(check_loss_at_init(net, (torch.randn(64, 16), torch.randint(0, 10, (64,)))), 1)
    2.3
    """
    __tracebackhide__ = True
    model = check_model(model)
    args, kwargs, target = split_batch(model, batch, "check_loss_at_init")
    args, kwargs = with_forward_kwargs(model, args, kwargs, forward_kwargs, "check_loss_at_init")
    if not (isinstance(rtol, (int, float)) and rtol > 0):
        raise ValueError(f"rtol must be a positive number, got rtol={rtol!r}")
    # in the model's own mode, as training starts: in eval mode an untrained batch norm uses its
    # initial running statistics, and a deep residual net's logits come out 30x too large
    with buffers_kept(model), rng_kept(model, seed), torch.no_grad():
        logits = loss_input(model(*args, **kwargs), output, loss_fn, "check_loss_at_init")
        loss = float(loss_of(loss_fn, logits, target, "check_loss_at_init"))
        judged = loss
        if expected is None:
            last = classes_last(loss_fn, logits, target)
            chance = _chance(loss_fn, logits, last) if isinstance(logits, torch.Tensor) else None
            if chance is None:
                raise ValueError(
                    "check_loss_at_init: expected= is needed for this loss_fn or output; the chance value "
                    "is known for cross-entropy (log of the number of classes) and BCE with logits (log 2) "
                    f"on a tensor of logits (got {describe(logits)})"
                )
            expected_value, judged, meaning = chance
        else:
            expected_value, meaning = float(expected), "expected"
        if math.isfinite(judged) and abs(judged - expected_value) <= rtol * abs(expected_value):
            return loss
        scale = ""
        if isinstance(logits, torch.Tensor) and logits.is_floating_point():
            scale = f"; the output's std is {float(logits.float().std()):.3g}"
            scale += _loudest_layer(model, args, kwargs, output, loss_fn)
        scale += _eval_mode_norms(model)
    what = (
        "above" if judged > expected_value else "below" if math.isfinite(judged) else "not finite, not near"
    )
    averaged = f" ({judged:.4g} averaged over every label)" if judged != loss else ""
    note = (
        f"the loss at init is {loss:.4g}{averaged}, {what} {expected_value:.4g} = {meaning} by more "
        f"than rtol={rtol:g}{scale}"
    )
    bound = f"{expected_value:.4g} +- {rtol:g}x"
    finding = Finding("", type(model).__name__, "loss at init", judged, bound, None, note)
    raise HealthError(f"loss-at-init check failed: {note}", [finding])


def _eval_mode_norms(model: nn.Module) -> str:
    """A hint where the model runs in eval mode with batch norms that never saw a batch: their
    running statistics are still mean 0, variance 1, so they normalise nothing, and a deep net's
    logits grow layer on layer (timm's Inception-v3 at init: a loss of 3e12)."""
    fresh = [name for name, module in untrained_batch_norms(model) if not module.training]
    if not fresh:
        return ""
    which = f"{len(fresh)} batch norms ({fresh[0]!r} first)" if len(fresh) > 1 else f"batch norm {fresh[0]!r}"
    return (
        f"; the model is in eval mode, and its {which} normalise with running statistics that "
        "never saw a batch (mean 0, variance 1): check it in train mode, as its first step runs"
    )


def _perturbed(tensor: torch.Tensor, generator: torch.Generator, where: Any = None) -> torch.Tensor:
    """Other values of the same kind: token ids within the ids seen, floats at the same mean
    and std (a zero tensor: a standard normal), booleans flipped."""
    replaced = tensor.clone()
    values = tensor if where is None else tensor[where]
    if tensor.dtype == torch.bool:
        new = ~values
    elif tensor.is_floating_point() or tensor.is_complex():
        std = float(values.float().std()) if values.numel() > 1 else 0.0
        std = std or 1.0
        noise = torch.randn(values.shape, generator=generator).to(tensor.device, tensor.dtype)
        new = values + noise * std
    else:
        low, high = int(tensor.min()), int(tensor.max())
        if high == low:
            high = low + 1
        shift = torch.randint(1, high - low + 1, values.shape, generator=generator).to(
            tensor.device, tensor.dtype
        )
        new = low + (values - low + shift) % (high - low + 1)
    if where is None:
        return new
    replaced[where] = new
    return replaced


def _changed(before: Any, after: Any, atol: float) -> float:
    """The largest absolute change between two outputs' leaves."""
    worst = 0.0
    for (_, one), (_, other) in zip(tensor_leaves(before), tensor_leaves(after), strict=False):
        if one.shape != other.shape:
            return math.inf
        difference = (one.double() - other.double()).abs()
        worst = max(worst, float(difference.nan_to_num(math.inf).max()) if difference.numel() else 0.0)
    return worst


def input_use(
    model: nn.Module,
    input: Any,
    *,
    positions: bool | None = None,
    atol: float = 1e-6,
    seed: int = 0,
    max_positions: int = 64,
    **forward_kwargs: Any,
) -> list[Finding]:
    """Which inputs (and positions) the output does not depend on: each tensor input is given
    other values of its kind (token ids within the range seen, floats at the same scale) and
    the output compared; one :class:`~pytest_modelhooks.findings.Finding` per input whose
    change moves no output value by more than ``atol``. With ``positions`` (default: for
    integer inputs of shape (batch, length), token ids), each position along dimension 1 is
    changed alone, up to ``max_positions`` of them spread over the length. Eval mode, no grad,
    the RNG put back; nothing of the model changes.

    >>> class Ignores(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.proj = nn.Linear(4, 2)
    ...     def forward(self, x, mask):
    ...         return self.proj(x)  # the mask is wired to nothing
    >>> [(f.layer, f.statistic) for f in input_use(Ignores(), (torch.randn(3, 4), torch.ones(3, 4)))]
    [('mask', 'unused input')]
    """
    model = check_model(model)
    args, kwargs = normalise_input(input, "input", model)
    args, kwargs = with_forward_kwargs(model, args, kwargs, forward_kwargs, "check_uses_input")
    names = _input_names(model, args)
    generator = torch.Generator().manual_seed(seed)
    found = []
    with preserve_training_flags(model, eval_mode=True), rng_kept(model, seed), torch.no_grad():
        baseline = model(*args, **kwargs)
        for label, swap, tensor in _leaves(args, kwargs, names):
            moved = _changed(baseline, _call_with(model, swap, _perturbed(tensor, generator)), atol)
            if moved <= atol:
                note = (
                    f"given other values ({_kind(tensor)}), the input {label} {tuple(tensor.shape)} "
                    f"changes no output by more than atol={atol:g}: wired to nothing, or multiplied by zero"
                )
                found.append(Finding(label, "input", "unused input", moved, f"> {atol:g}", None, note))
                continue
            tokens = not tensor.is_floating_point() and tensor.dim() == 2
            if (tokens if positions is None else positions) and tensor.dim() >= 2:
                found += _position_use(model, baseline, label, swap, tensor, generator, atol, max_positions)
    return found


def _position_use(
    model: nn.Module,
    baseline: Any,
    label: str,
    swap: Callable[[Any], tuple[tuple[Any, ...], dict[str, Any]]],
    tensor: torch.Tensor,
    generator: torch.Generator,
    atol: float,
    max_positions: int,
) -> list[Finding]:
    length = tensor.shape[1]
    count = min(length, max_positions)  # spread over the length: the first, the last, between
    chosen = sorted({round(i * (length - 1) / max(1, count - 1)) for i in range(count)})
    unused = []
    for position in chosen:
        where = (slice(None), position)
        changed = _call_with(model, swap, _perturbed(tensor, generator, where))
        if _changed(baseline, changed, atol) <= atol:
            unused.append(position)
    if not unused:
        return []
    shown = ", ".join(map(str, unused[:10])) + (f" and {len(unused) - 10} more" if len(unused) > 10 else "")
    note = (
        f"changing {label} at position(s) {shown} (of {length}; {len(chosen)} tried) changes no output: "
        "truncated, masked out, or read from the wrong dimension"
    )
    return [Finding(label, "input", "unused positions", float(len(unused)), "0", None, note)]


def _kind(tensor: torch.Tensor) -> str:
    if tensor.dtype == torch.bool:
        return "flipped"
    if tensor.is_floating_point():
        return "the same scale"
    return f"ids in {int(tensor.min())}..{int(tensor.max())}"


def _input_names(model: nn.Module, args: tuple[Any, ...]) -> list[str]:
    parameters = forward_parameter_names(model)
    return [parameters[index] if index < len(parameters) else f"args[{index}]" for index in range(len(args))]


def _leaves(
    args: tuple[Any, ...], kwargs: dict[str, Any], names: Sequence[str]
) -> Iterator[tuple[str, Callable[[Any], tuple[tuple[Any, ...], dict[str, Any]]], torch.Tensor]]:
    """Each tensor input (top-level positional or keyword, not inside containers) with a
    function that gives the call's arguments with it replaced."""
    for index, value in enumerate(args):
        if isinstance(value, torch.Tensor) and value.numel():

            def swap_arg(new: Any, index: int = index) -> tuple[tuple[Any, ...], dict[str, Any]]:
                return (*args[:index], new, *args[index + 1 :]), kwargs

            yield names[index], swap_arg, value
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.numel():

            def swap_kwarg(new: Any, key: str = key) -> tuple[tuple[Any, ...], dict[str, Any]]:
                return args, {**kwargs, key: new}

            yield key, swap_kwarg, value


def _call_with(
    model: nn.Module,
    swap: Callable[[Any], tuple[tuple[Any, ...], dict[str, Any]]],
    new: torch.Tensor,
) -> Any:
    call_args, call_kwargs = swap(new)
    return model(*call_args, **call_kwargs)


def check_uses_input(model: nn.Module, input: Any, **options: Any) -> None:
    """Raise :class:`~pytest_modelhooks.findings.HealthError` naming each input (and position)
    the output does not depend on (:func:`input_use`).

    >>> check_uses_input(nn.Sequential(nn.Linear(4, 2)), torch.randn(3, 4))
    """
    __tracebackhide__ = True
    found = input_use(model, input, **options)
    if found:
        raise HealthError(
            f"input-use check failed: {len(found)} input(s) the output does not depend on\n"
            + format_findings(found, unit=""),
            found,
        )
