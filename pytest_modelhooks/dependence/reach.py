"""What a model's output depends on, found with gradients: samples of a batch that leak into
each other, a decoder that looks at later positions. Each leak is named at the layer where it
happens.

A model should compute sample ``k``'s output from sample ``k`` alone (in eval mode), and a
causal language model position ``t``'s output from positions ``<= t`` alone. Bugs that break
this are silent: a ``view`` that folds the batch into the sequence, attention handed
``(batch, seq, dim)`` without ``batch_first=True`` (it attends across the batch), a causal mask
left out or shifted by one. The loss still goes down, often faster.

The check takes the gradient of one sample's (or position's) output, under a fixed random
weighting, with respect to every module's inputs and outputs in one backward: the modules whose
inputs for other samples reach it are the suspects. Each suspect is then checked alone, its
output's entry against its own inputs (a backward through that module only), so every module
that mixes is named, not only the last one; the innermost is reported, and mixing in a
forward's own code is placed between two of its modules. Only the model's input tells samples
apart: when its other samples do not reach the output, nothing leaks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pytest_modelhooks._tree import tensor_leaves
from pytest_modelhooks.dependence.calls import (
    ModuleCall,
    OutputSpec,
    check_indices,
    recorded_run,
    select_output,
)
from pytest_modelhooks.findings import Finding, raise_for
from pytest_modelhooks.hooks.select import ModuleSpec
from pytest_modelhooks.inputs import check_model, normalise_input
from pytest_modelhooks.tracing.state import BATCH_NORMS, buffers_kept


@dataclass
class _Reach:
    """How one tensor's entries along the checked axis reach the checked output."""

    known: bool  # the tensor has the axis (a batch of 3 where the output has one of 3)
    leaked: list[int]  # forbidden indices (other samples, later positions) that reach it
    ratio: float  # their largest gradient over the largest allowed one
    seen: bool = True  # its allowed entries reach the output (the check can see through it)


_UNKNOWN = _Reach(False, [], 0.0, seen=False)


_CLEAN = _Reach(True, [], 0.0)


_UNSEEN = _Reach(True, [], 0.0, seen=False)


def _axis(shape: Sequence[int], preferred: int, size: int, broadcast: bool = False) -> int | None:
    """The axis of a tensor of ``shape`` that is the checked one: ``preferred`` where its size
    fits, else the only axis of that size (a sequence-first layer inside a batch-first model).
    With ``broadcast`` (the batch check), length 1 there is a tensor shared by every sample (a
    position bias of shape ``(1, heads, T, T)``): it has no such axis, even where its heads
    number as many as the samples."""
    if len(shape) > preferred and shape[preferred] == size:
        return preferred
    if broadcast and len(shape) > preferred and shape[preferred] == 1:
        return None
    fitting = [axis for axis, length in enumerate(shape) if length == size]
    return fitting[0] if len(fitting) == 1 else None


def _reach(
    tensor: torch.Tensor,
    grad: torch.Tensor | None,
    preferred: int,
    size: int,
    allowed: Sequence[int],
    forbidden: Sequence[int],
    rtol: float,
    broadcast: bool,
) -> _Reach:
    axis = _axis(tensor.shape, preferred, size, broadcast)
    if axis is None:
        return _UNKNOWN
    if grad is None:
        return _UNSEEN
    magnitude = grad.detach().abs().float()
    others = [dim for dim in range(magnitude.dim()) if dim != axis]
    per_index = (magnitude.amax(dim=others) if others else magnitude).tolist()
    if not all(math.isfinite(value) for value in per_index):  # read anyway: no extra sync
        raise _NonFiniteGradient
    own = max(per_index[index] for index in allowed)
    leaked = [index for index in forbidden if per_index[index] > rtol * own]
    if not leaked:
        return _CLEAN if own > 0 else _UNSEEN
    worst = max(per_index[index] for index in leaked)
    return _Reach(True, leaked, worst / own if own > 0 else float("inf"))


def _worst(reaches: list[_Reach]) -> _Reach:
    """A call's inputs (or outputs) together: leaked if any one leaked, unknown if none is known."""
    known = [reach for reach in reaches if reach.known]
    if not known:
        return _UNKNOWN
    worst = max(known, key=lambda reach: (bool(reach.leaked), reach.ratio))
    if not worst.seen and any(reach.seen for reach in known):
        return _CLEAN
    return worst


def _indices(indices: list[int]) -> str:
    shown = ", ".join(str(index) for index in indices[:6])
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > 6 else "")


def inside_of(name: str, container: str) -> bool:
    return name != container and (container == "" or name.startswith(container + "."))


@dataclass(frozen=True)
class _Kind:
    statistic: str  # "batch leak" / "future leak"
    own: str  # "for sample {k}" / "at position {k}"
    others: str  # "for sample(s)" / "at later position(s)"
    what: str  # "it mixes the batch" / "it looks ahead"
    entries: str  # "other samples" / "later positions"


_BATCH = _Kind("batch leak", "for sample {k}", "for sample(s)", "it mixes the batch", "other samples")


_CAUSAL = _Kind("future leak", "at position {k}", "at later position(s)", "it looks ahead", "later positions")


def _hint(kind: _Kind, module: nn.Module, train: bool) -> str:
    if isinstance(module, nn.MultiheadAttention) or "Attention" in type(module).__name__:
        if kind is _BATCH:
            return " (attention across the batch: (batch, seq, ...) given without batch_first=True?)"
        return " (attention that sees later positions: no causal mask, or one shifted by one?)"
    if isinstance(module, nn.RNNBase):
        if kind is _BATCH and not module.batch_first:
            return " (an RNN without batch_first=True given (batch, seq, ...) runs along the batch?)"
        if kind is _CAUSAL and module.bidirectional:
            return " (a bidirectional RNN reads the sequence backwards too)"
    if kind is _BATCH and train and isinstance(module, BATCH_NORMS):
        return " (BatchNorm in train mode normalises over the batch, as designed)"
    if kind is _BATCH:
        return " (a reduction, reshape or transpose over the batch dimension?)"
    return " (a missing or shifted causal mask?)"


class _Probe:
    """Gradients of one entry (sample or position ``target``) of some output, under a fixed
    random weighting (a plain sum can cancel: softmax rows sum to 1)."""

    def __init__(
        self,
        preferred: int,
        size: int,
        rtol: float,
        allowed: list[int],
        forbidden: list[int],
        broadcast: bool,
    ) -> None:
        self.preferred, self.size, self.rtol = preferred, size, rtol
        self.allowed, self.forbidden, self.broadcast = allowed, forbidden, broadcast
        self.generator = torch.Generator().manual_seed(0)

    def batched(self, shapes: Sequence[Sequence[int]]) -> bool:
        """Whether any of the tensors of these shapes has the checked axis."""
        return any(_axis(shape, self.preferred, self.size, self.broadcast) is not None for shape in shapes)

    def objective(self, outputs: Sequence[torch.Tensor], target: int) -> torch.Tensor | None:
        total: torch.Tensor | None = None
        for output in outputs:
            axis = _axis(output.shape, self.preferred, self.size, self.broadcast)
            if axis is None:
                continue
            part = output.select(axis, target)
            part = (torch.view_as_real(part) if part.is_complex() else part).float()
            weights = torch.randn(part.shape, generator=self.generator).to(part.device)
            term = (part * weights).sum()
            total = term if total is None else total + term
        return total

    def reach(self, objective: torch.Tensor, tensors: list[torch.Tensor]) -> dict[int, _Reach]:
        """Per tensor (by id): whether its forbidden entries reach ``objective``."""
        if not tensors:
            return {}
        grads = torch.autograd.grad(objective, tensors, retain_graph=True, allow_unused=True)
        return {
            id(tensor): _reach(
                tensor,
                grad,
                self.preferred,
                self.size,
                self.allowed,
                self.forbidden,
                self.rtol,
                self.broadcast,
            )
            for tensor, grad in zip(tensors, grads, strict=True)
        }


def _states(calls: list[ModuleCall], reaches: dict[int, _Reach]) -> list[tuple[ModuleCall, _Reach, _Reach]]:
    return [
        (
            call,
            _worst([reaches.get(id(t), _UNKNOWN) for t in call.inputs]),
            _worst([reaches.get(id(t), _UNKNOWN) for t in call.outputs]),
        )
        for call in calls
    ]


def _tensors(calls: list[ModuleCall]) -> list[torch.Tensor]:
    return list({id(t): t for call in calls for t in (*call.inputs, *call.outputs)}.values())


def _between(states: list[tuple[ModuleCall, _Reach, _Reach]]) -> str:
    """Where in a forward's own code the leak is: after the last call whose output leaks,
    before the first later call whose input is clean and computed from that output (not a
    call of a parallel branch, such as a timestep embedding beside the label one)."""
    last = max((index for index, (_, _, outputs) in enumerate(states) if outputs.leaked), default=None)
    if last is None:
        first = next((call for call, inputs, _ in states if inputs.known and not inputs.leaked), None)
        return f", before {first.label!r}" if first is not None else ""
    leaking = states[last][0]
    after = leaking.label
    following = next(
        (
            call
            for call, inputs, _ in states[last + 1 :]
            if inputs.known and not inputs.leaked and _computed_from(call.inputs, leaking.outputs)
        ),
        None,
    )
    if following is None:
        return f", after {after!r}"
    return f", between {after!r} and {following.label!r}"


def _computed_from(tensors: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> bool:
    """Whether autograd has a path from any of ``sources`` to any of ``tensors``."""
    wanted = [tensor for tensor in sources if tensor.requires_grad]
    for tensor in tensors:
        if not (wanted and tensor.requires_grad and tensor.grad_fn is not None):
            continue
        probe = (tensor.float() if tensor.is_floating_point() else torch.view_as_real(tensor)).sum()
        grads = torch.autograd.grad(probe, wanted, retain_graph=True, allow_unused=True)
        if any(grad is not None for grad in grads):
            return True
    return False


def _findings_for_target(
    calls: list[ModuleCall],
    checked: torch.Tensor,
    model: nn.Module,
    probe: _Probe,
    target: int,
    kind: _Kind,
    train: bool,
) -> list[Finding]:
    objective = probe.objective([checked], target)
    if objective is None:
        return []
    # one backward: which layers' tensors reach the checked entry through forbidden entries
    states = _states(calls, probe.reach(objective, _tensors(calls)))
    # Only the model's input tells samples apart: if its other samples do not reach the checked
    # one, nothing leaks (a layer after a reshape may carry the batch on an axis that only looks
    # like it). Its floating-point part is the model's own input; an integer part (token ids,
    # class labels) enters where a module turns it into floats: the output of a call given no
    # floating-point input (an embedding) and indices that have the checked axis (not T5's
    # relative position buckets, shaped (T, T), whose bias has one axis per head).
    sources = [inputs for call, inputs, _ in states if call.name == "" and inputs.known]
    sources += [
        outputs
        for call, _, outputs in states
        if call.name and not call.inputs and outputs.known and probe.batched(call.index_shapes)
    ]
    if sources and not any(source.seen or source.leaked for source in sources):
        return [_unseen(model, kind, own=kind.own.format(k=target))]
    if sources and not any(source.leaked for source in sources):
        return []
    if not any(state.leaked for _, inputs, outputs in states for state in (inputs, outputs)):
        return []
    own = kind.own.format(k=target)
    # A layer that mixes has an input whose forbidden entries reach the output; each such
    # layer is checked alone (its output's entry against its own inputs: a backward through
    # that layer only), so every layer that mixes is found, not only the last one.
    mixing: list[tuple[ModuleCall, _Reach]] = []
    for call, inputs, _ in states:
        local = probe.objective(call.outputs, target) if inputs.leaked else None
        if local is None:
            continue
        alone = _worst(list(probe.reach(local, call.inputs).values()))
        if alone.leaked:
            mixing.append((call, alone))
    # the innermost: a block holding a layer that mixes mixes too
    innermost = [
        (call, alone)
        for call, alone in mixing
        if not any(inside_of(other.name, call.name) for other, _ in mixing)
    ]
    findings = []
    for call, alone in innermost:
        inside = [other for other in calls if inside_of(other.name, call.name)]
        if inside:
            local = probe.objective(call.outputs, target)
            assert local is not None  # (built above)
            where = _between(_states(inside, probe.reach(local, _tensors(inside))))
            note = (
                f"its output {own} depends on its input {kind.others} {_indices(alone.leaked)} "
                f"through {call.type}.forward's own code{where}{_hint(kind, call.module, train)}"
            )
        else:
            note = (
                f"its output {own} depends on its input {kind.others} {_indices(alone.leaked)}: "
                f"{kind.what}{_hint(kind, call.module, train)}"
            )
        findings.append(Finding(call.label, call.type, kind.statistic, alone.ratio, "0", target, note))
    if not findings:
        # the leak enters where no module's input can be followed (token ids into the model)
        worst = max(state.ratio for _, _, state in states if state.leaked)
        note = f"its output {own} depends on {kind.entries} through the forward's own code{_between(states)}"
        findings.append(Finding("", type(model).__name__, kind.statistic, worst, "0", target, note))
    return findings


def _leaks(
    model: nn.Module,
    input: Any,
    *,
    kind: _Kind,
    dim: int,
    targets: Callable[[int], Sequence[int]],
    forbidden_of: Callable[[int, int], tuple[list[int], list[int]]],
    output: OutputSpec,
    modules: ModuleSpec,
    rtol: float,
    train: bool,
    forward_kwargs: dict[str, Any],
    caller: str,
) -> list[Finding]:
    model = check_model(model)
    if not (isinstance(rtol, (int, float)) and not isinstance(rtol, bool) and 0 <= rtol < 1):
        raise ValueError(f"rtol must be a number in [0, 1), got rtol={rtol!r}")
    with (
        zero_init_perturbed(model) as perturbed,
        buffers_kept(model, when=train),
        recorded_run(model, input, forward_kwargs, modules, train, caller) as (result, calls),
        _reentrant_named(),
    ):
        checked = select_output(result, output)
        axis_name = "dim" if kind is _BATCH else "seq_dim"
        if checked.dim() <= dim:
            raise ValueError(
                f"{caller}(): the checked output has shape {tuple(checked.shape)}, no dimension {dim}; "
                f"pick the output with output= or its axis with {axis_name}="
            )
        size = checked.shape[dim]
        if kind is _BATCH:
            _check_batch_axis(checked, dim, input, model, caller)
        if size < 2:
            what = "samples in the batch" if kind is _BATCH else "positions in the sequence"
            raise ValueError(
                f"{caller}() needs at least 2 {what}: the output has shape {tuple(checked.shape)} "
                f"({axis_name}={dim} is {size} long)"
            )
        if not checked.requires_grad:
            raise ValueError(
                f"{caller}(): the output does not depend on anything that carries a gradient "
                f"(no floating-point input and no floating-point parameter before it)"
            )
        if not bool(torch.isfinite(checked).all()):
            return [_blind(calls, model, kind, "output")]
        findings: dict[str, Finding] = {}
        unseen: Finding | None = None
        seen = False
        chosen = list(targets(size))
        # an entry blind at this input (a small layer's ReLU zeroes one sample's output) tells
        # nothing: the others are tried in turn, and only if none can see does the check fail
        for target in [*chosen, *(index for index in range(size) if index not in chosen)]:
            if seen and target not in chosen:
                break
            allowed, forbidden = forbidden_of(target, size)
            if not forbidden:
                continue
            probe = _Probe(dim, size, rtol, allowed, forbidden, broadcast=kind is _BATCH)
            try:
                found = _findings_for_target(calls, checked, model, probe, target, kind, train)
            except _NonFiniteGradient:
                return [_blind(calls, model, kind, "gradient")]
            if found and found[0].statistic == "unseen":
                unseen = unseen or found[0]
                continue
            seen = True
            for finding in found:
                findings.setdefault(finding.layer, finding)
        if unseen is not None and not seen:
            return [unseen]
        return [_seen_with(finding, perturbed) for finding in findings.values()]


def _seen_with(finding: Finding, perturbed: list[str]) -> Finding:
    """A leak found with zero-initialised parameters made nonzero says so: at init the model's
    output does not show it yet."""
    if not perturbed or finding.statistic == "unseen":
        return finding
    shown = ", ".join(perturbed[:3]) + (f" and {len(perturbed) - 3} more" if len(perturbed) > 3 else "")
    note = f"{finding.note}; seen with the all-zero parameter(s) {shown} made nonzero (at init they hide it)"
    return dataclasses.replace(finding, note=note)


def _check_batch_axis(checked: torch.Tensor, dim: int, input: Any, model: nn.Module, caller: str) -> None:
    """The checked output must still have the input's batch along ``dim``: where a mean or a
    reshape took it away, every layer would look like it mixes samples."""
    args, kwargs = normalise_input(input, "input", model)
    leaves = [tensor for _, tensor in tensor_leaves((args, kwargs)) if tensor.dim() > dim]
    if not leaves:
        return
    batch = leaves[0].shape[dim]
    if checked.shape[dim] != batch:
        raise ValueError(
            f"{caller}(): the input's batch is {batch} along dim={dim}, but the checked output has "
            f"shape {tuple(checked.shape)}: it lost the batch axis (a mean, sum or reshape over "
            f"it?), so samples cannot be told apart; check an output that keeps it (output=) or "
            f"give its axis (dim=)"
        )


class _NonFiniteGradient(Exception):
    """A gradient the check reads is NaN or infinite: it cannot tell what reaches the output."""


def _blind(calls: list[ModuleCall], model: nn.Module, kind: _Kind, what: str) -> Finding:
    """The finding of a check that cannot see: non-finite values, named at the first module
    (in the order calls end: the innermost first) whose output holds one, else the model."""
    first = next(
        (call for call in calls if any(not bool(torch.isfinite(out).all()) for out in call.outputs)), None
    )
    layer, kind_name = (first.label, first.type) if first is not None else ("", type(model).__name__)
    where = "from here on" if first is not None else "in the forward"
    note = (
        f"the {what} is not finite ({where}: NaN or infinity, in a parameter or an input?), so the "
        f"check cannot tell whether {kind.entries} reach the output; it fails rather than pass blind"
    )
    return Finding(layer, kind_name, "nonfinite", math.nan, "finite", None, note)


def _unseen(model: nn.Module, kind: _Kind, own: str) -> Finding:
    """The finding of a check whose output does not depend on the model's input at all."""
    note = (
        f"the checked output {own} does not depend on the model's input (a frozen, detached "
        f"or constant path?), so the check cannot tell whether {kind.entries} reach it; it "
        f"fails rather than pass blind"
    )
    return Finding("", type(model).__name__, "unseen", math.nan, "depends on the input", None, note)


@contextmanager
def zero_init_perturbed(model: nn.Module) -> Iterator[list[str]]:
    """Trainable parameters that are all zeros (adaLN-Zero gates, a zero-initialised head,
    ReZero) made small random values for the check, and put back after: at init they hide
    what reaches the output (a gate of 0 passes nothing), though training moves them at once.
    Yields their names. Biases are left alone: a zero bias adds nothing but gates nothing
    either (nanoGPT zeroes them all). The draws use a private generator (the user's random
    state is kept)."""
    generator = torch.Generator().manual_seed(0)
    zeroed: list[tuple[str, nn.Parameter]] = []
    for name, param in model.named_parameters():
        if (
            param.requires_grad
            and not name.endswith("bias")
            and param.is_floating_point()
            and param.numel()
            and param.device.type != "meta"
            and not bool(param.detach().any())
        ):
            zeroed.append((name, param))
    try:
        with torch.no_grad():
            for _, param in zeroed:
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * 0.02
                param.copy_(noise.to(param.device, param.dtype))
        yield [name for name, _ in zeroed]
    finally:
        with torch.no_grad():
            for _, param in zeroed:
                param.zero_()


@contextmanager
def _reentrant_named() -> Iterator[None]:
    """torch's error for ``checkpoint(..., use_reentrant=True)`` under ``autograd.grad``, with
    what to do about it here."""
    try:
        yield
    except RuntimeError as error:
        if "use_reentrant=True" not in str(error):
            raise
        raise RuntimeError(
            "the model runs torch.utils.checkpoint with use_reentrant=True, which the gradients "
            "these checks take cannot go through: check it with checkpointing off (e.g. "
            "model.gradient_checkpointing_disable()) or with use_reentrant=False"
        ) from error


def batch_leaks(
    model: nn.Module,
    input: Any,
    *,
    samples: Sequence[int] | None = None,
    dim: int = 0,
    output: OutputSpec = None,
    modules: ModuleSpec = None,
    rtol: float = 1e-6,
    train: bool = False,
    **forward_kwargs: Any,
) -> list[Finding]:
    """Layers where the samples of a batch leak into each other, as :class:`Finding` rows
    (empty when every sample's output depends on that sample alone).

    ``input`` is a batch (a tensor, a tuple of positional inputs or a dict of keyword ones;
    other keywords go to the forward). The output's sample ``k`` (``samples``, default the
    first and the last: a leak can run one way only) is traced back through every module's
    inputs and outputs; named are the innermost modules whose own output for sample ``k``
    depends on their input for other samples (every one, not only the last), or the stretch
    of a forward's own code between two modules. The model runs in eval mode (BatchNorm then uses its running
    statistics; ``train=True`` keeps the modes, and puts the running statistics back).
    Layers whose tensors carry the batch on another axis are followed (the only axis of the
    batch's size), so use a batch size that no other dimension has (3 or 5). ``output``
    selects the tensor checked (a key, an attribute or a callable; default the first
    floating-point one). The model is left as it was: no hooks, the same flags, no ``.grad``.

    >>> class Leaky(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)
    ...     def forward(self, x):
    ...         h = self.a(x)
    ...         return self.b(h - h.mean(0))  # centred over the batch: a leak
    >>> (finding,) = batch_leaks(Leaky(), torch.randn(3, 4))
    >>> print(finding.note)  # doctest: +NORMALIZE_WHITESPACE
    its output for sample 0 depends on its input for sample(s) 1, 2 through Leaky.forward's own
    code, between 'a' and 'b' (a reduction, reshape or transpose over the batch dimension?)
    >>> finding.layer  # the model itself
    ''

    >>> batch_leaks(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.randn(3, 4))
    []
    """
    __tracebackhide__ = True

    def targets(size: int) -> list[int]:
        chosen = check_indices("samples", samples, size, "samples")
        return chosen if chosen is not None else sorted({0, size - 1})

    def split(target: int, size: int) -> tuple[list[int], list[int]]:
        return [target], [index for index in range(size) if index != target]

    return _leaks(
        model,
        input,
        kind=_BATCH,
        dim=dim,
        targets=targets,
        forbidden_of=split,
        output=output,
        modules=modules,
        rtol=rtol,
        train=train,
        forward_kwargs=forward_kwargs,
        caller="batch_leaks",
    )


def causal_leaks(
    model: nn.Module,
    input: Any,
    *,
    positions: Sequence[int] | None = None,
    seq_dim: int = 1,
    output: OutputSpec = None,
    modules: ModuleSpec = None,
    rtol: float = 1e-6,
    train: bool = False,
    **forward_kwargs: Any,
) -> list[Finding]:
    """Layers through which a causal model's output at position ``t`` depends on later
    positions, as :class:`Finding` rows (empty for a model that never looks ahead).

    ``positions`` are the output positions checked (default: every one but the last, up to
    8 spread over the sequence, the first included: a backward each), ``seq_dim`` the
    output's sequence axis (1 for ``(batch, seq, vocab)`` logits). Token ids work as input:
    the check starts at the first layer that makes floating-point values (the embedding).
    Otherwise as :func:`batch_leaks`.

    >>> layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    >>> [f.layer for f in causal_leaks(layer, torch.randn(2, 5, 8))]  # no mask: looks ahead
    ['self_attn']
    >>> mask = nn.Transformer.generate_square_subsequent_mask(5)
    >>> causal_leaks(layer, torch.randn(2, 5, 8), src_mask=mask, is_causal=True)
    []
    """
    __tracebackhide__ = True

    def targets(size: int) -> list[int]:
        chosen = check_indices("positions", positions, size, "positions")
        if chosen is not None:
            return chosen
        last = size - 2
        count = min(8, last + 1)
        return sorted({round(index * last / max(count - 1, 1)) for index in range(count)})

    def split(target: int, size: int) -> tuple[list[int], list[int]]:
        return list(range(target + 1)), list(range(target + 1, size))

    return _leaks(
        model,
        input,
        kind=_CAUSAL,
        dim=seq_dim,
        targets=targets,
        forbidden_of=split,
        output=output,
        modules=modules,
        rtol=rtol,
        train=train,
        forward_kwargs=forward_kwargs,
        caller="causal_leaks",
    )


def check_batch_independence(model: nn.Module, input: Any, **options: Any) -> None:
    """Raise :class:`~pytest_modelhooks.findings.HealthError` naming every layer where samples
    of the batch leak into each other (:func:`batch_leaks`, same arguments).

    >>> check_batch_independence(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.randn(3, 4))
    """
    __tracebackhide__ = True
    raise_for(batch_leaks(model, input, **options), "batch independence", unit="sample")


def check_causal(model: nn.Module, input: Any, **options: Any) -> None:
    """Raise :class:`~pytest_modelhooks.findings.HealthError` naming every layer through which
    an output position depends on later ones (:func:`causal_leaks`, same arguments).

    >>> check_causal(nn.Linear(8, 8), torch.randn(2, 5, 8))  # position-wise: causal
    """
    __tracebackhide__ = True
    raise_for(causal_leaks(model, input, **options), "causal", unit="position")
