"""Health rules over recorded statistics: findings as data, every bad layer named.

Activation rules: std out of range (vanishing or exploding), too many dead units, too many
values near zero, std growing too fast from one layer to the next, and non-finite values, for
which the *first* layer in execution order that produced one is named together with the layer
before it. Gradient rules: norms out of range, non-finite gradients, trainable parameters that
never got a gradient, parameters that never changed.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import torch

from pytest_modelhooks.findings import Finding
from pytest_modelhooks.health.bounds import ACTIVATION_BOUNDS, GRADIENT_BOUNDS, check_order
from pytest_modelhooks.health.unused import unused_findings
from pytest_modelhooks.hooks.select import ModuleSpec, select_modules

if TYPE_CHECKING:
    from pytest_modelhooks.stats.activations import ActivationStats
    from pytest_modelhooks.stats.gradients import GradientStats
    from pytest_modelhooks.stats.records import LayerStats


def _worst(values: torch.Tensor, batches: torch.Tensor, *, largest: bool) -> tuple[float, int]:
    finite = torch.where(
        torch.isnan(values), torch.full_like(values, -math.inf if largest else math.inf), values
    )
    position = int(finite.argmax() if largest else finite.argmin())
    return float(values[position]), int(batches[position])


# BatchNorm2d, LayerNorm, GroupNorm, InstanceNorm1d, RMSNorm, LlamaRMSNorm, T5LayerNorm...
_NORMALIZATION = re.compile(r"Norm(\d?d)?$")


def activation_findings(
    stats: ActivationStats,
    *,
    std: tuple[float, float] | None = None,
    max_dead: float | None = None,
    max_near_zero: float | None = None,
    max_std_growth: float | None = None,
    allow_nonfinite: bool = False,
    exclude: ModuleSpec = None,
) -> list[Finding]:
    """Every broken rule among the recorded activation statistics, in execution order.

    * ``std=(low, high)``: each series' std must stay within, on every batch.
    * ``max_dead``: the fraction of channels never above zero, per layer, judged where values
      are rectified (a ReLU-family module's output, a tensor a ReLU-family module or ``F.relu``
      consumes, values never below zero): before SiLU or a sigmoid, and in logits, a negative
      value is not dead.
    * ``max_near_zero``: the fraction of values with ``|x| <= eps``, on every batch.
    * ``max_std_growth``: std of a layer over the std of the recorded layers whose outputs it
      was given (by identity; where none was recorded, the layer before it if a sibling, never
      another branch), on every batch; not judged into a normalization layer (BatchNorm,
      LayerNorm, GroupNorm, RMSNorm, ``...Norm`` classes of other libraries), whose output scale
      is set by its own weights: a transformer's small residual branch into its LayerNorm is not
      an explosion.
    * ``allow_nonfinite=False``: the first layer (execution order) that produced NaN/Inf.
    * ``exclude``: modules (a spec as ``modules=`` takes: names, globs, types) whose outputs,
      and those of everything inside them, are not judged by the bounds: layers zero-initialised
      by design (adaLN-Zero, LayerScale, ReZero). Non-finite values are judged everywhere.

    >>> from torch import nn
    >>> from pytest_modelhooks import ActivationStats
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    >>> _ = nn.init.constant_(net[0].bias, -100.0)  # every unit below zero: dead
    >>> with ActivationStats(net) as stats:
    ...     _ = net(torch.randn(16, 4))
    >>> for finding in activation_findings(stats, max_dead=0.5, std=(0.1, 10.0)):
    ...     print(finding)
    0 (Linear): dead 1, bound <= 0.5 (8 of 8 channels never active)
    """
    given = {
        "std": std,
        "max_dead": max_dead,
        "max_near_zero": max_near_zero,
        "max_std_growth": max_std_growth,
    }
    for bound in ACTIVATION_BOUNDS:
        bound.validate(given[bound.name])
    recorded: frozenset[str] = stats.statistics
    _check_recorded(stats, given)
    layers = list(stats)
    found: list[Finding] = []
    if not allow_nonfinite:
        found += _first_nonfinite(layers, recorded)
    excluded = excluded_names(stats.model, exclude)
    by_name = {layer.name: layer for layer in layers}
    zero = _ZeroInitialised(stats.model, by_name)
    previous = None
    for layer in layers:
        if layer.same_as is not None and layer.same_as in by_name:
            continue  # the same tensor as an earlier layer's: judged there (or exempt there)
        if _within(layer.module, excluded):
            previous = None  # no growth into or out of an exempt layer
            continue
        if std is not None:
            found += _std_findings(layer, std, zero)
        if max_dead is not None:
            found += _dead_findings(layer, max_dead)
        if (
            max_near_zero is not None
            and bool((layer.near_zero > max_near_zero).any())
            and not zero.by_design(layer)
        ):
            value, batch = _worst(layer.near_zero, layer.batches, largest=True)
            found.append(Finding(layer.name, layer.type, "near_zero", value, f"<= {max_near_zero:g}", batch))
        if max_std_growth is not None and previous is not None:
            found += _growth_findings(layer, _fed_by(layer, previous, by_name), max_std_growth)
        previous = layer
    return found


def _kept_steps(grads: GradientStats) -> tuple[torch.Tensor, list[Finding]]:
    """The steps to judge, and a finding when there are none: under a GradScaler a step with
    non-finite gradients is skipped by design, unless no step was finite (the model, not the
    scale, makes them)."""
    found: list[Finding] = []
    skipped = grads.skipped_steps()
    kept = torch.ones(grads.num_steps, dtype=torch.bool)
    if skipped and len(skipped) < grads.num_steps:
        kept[skipped] = False
    elif skipped:
        kept[:] = False  # one finding for the model, not one per parameter
        found.append(
            Finding(
                "",
                type(grads.model).__name__,
                "nonfinite grad",
                float(len(skipped)),
                "a finite step",
                None,
                f"every step ({len(skipped)}) overflowed under the GradScaler: no finite gradient",
            )
        )
    return kept, found


def excluded_names(model: Any, exclude: ModuleSpec) -> frozenset[str]:
    """The qualified names of the modules ``exclude`` selects (empty for None)."""
    if exclude is None:
        return frozenset()
    return frozenset(name for name, _ in select_modules(model, exclude, argument="exclude"))


def _within(name: str, excluded: frozenset[str]) -> bool:
    """Whether module ``name`` is one of ``excluded`` or inside one."""
    if not excluded:
        return False
    while True:
        if name in excluded:
            return True
        if not name:
            return False
        name = name.rpartition(".")[0]


def _check_recorded(stats: ActivationStats, given: dict[str, Any]) -> None:
    """A bound needs its statistic recorded: say which, and how, before judging nothing."""
    for name, needs in (("std", "std"), ("max_std_growth", "std"), ("max_near_zero", "near_zero")):
        if given[name] is not None and needs not in stats.statistics:
            raise ValueError(f"{name}= needs {needs!r} recorded: add it to ActivationStats(statistics=...)")
    if given["max_dead"] is not None and not stats.track_dead:
        raise ValueError("max_dead= needs dead units recorded: ActivationStats(track_dead=True)")


def _std_findings(layer: LayerStats, std: tuple[float, float], zero: _ZeroInitialised) -> list[Finding]:
    low, high = std
    found = []
    below = layer.std < low
    above = layer.std > high
    nan = torch.full_like(layer.std, math.nan)
    if bool(below.any()) and not zero.by_design(layer):
        value, batch = _worst(torch.where(below, layer.std, nan), layer.batches, largest=False)
        note = "vanishing" + (zero.fed_note(layer) or _eps_note(zero.model, zero.by_name, layer, batch))
        found.append(Finding(layer.name, layer.type, "std", value, f">= {low:g}", batch, note))
    if bool(above.any()):
        value, batch = _worst(torch.where(above, layer.std, nan), layer.batches, largest=True)
        found.append(Finding(layer.name, layer.type, "std", value, f"<= {high:g}", batch, "exploding"))
    return found


def _eps_note(model: Any, by_name: dict[str, LayerStats], layer: LayerStats, batch: int) -> str:
    """For a vanishing normalization layer: where its input's variance is below its ``eps``,
    which then dominates the denominator (an input too small to normalise, not weights)."""
    if not _NORMALIZATION.search(layer.type):
        return ""
    try:
        eps = getattr(model.get_submodule(layer.module), "eps", None)
    except AttributeError:
        return ""
    sources = [by_name[name] for name in layer.inputs_from if name in by_name]
    if not isinstance(eps, float) or eps <= 0 or not sources:
        return ""
    # the inputs' std at the batch where it vanished
    at = [source.std[source.batches == batch] for source in sources]
    stds = [float(values.max()) for values in at if values.numel() and bool(values.isfinite().all())]
    if not stds or max(stds) ** 2 >= eps:
        return ""
    return (
        f": its input's std {max(stds):.3g} (variance {max(stds) ** 2:.2g}) is below the layer's "
        f"eps={eps:g}, which then sets the scale"
    )


#: Weights this small at init are zero-initialised by design, not vanishing by accident.
_ZERO_INIT = 1e-5  # LayerScale starts at 1e-6 (or 1e-5), adaLN-Zero and ReZero at 0


class _ZeroInitialised:
    """Which layers are zero-initialised by design: a small output there is the recipe (ViT's
    head, a residual branch's last BatchNorm with ``zero_init_residual``, adaLN-Zero, LoRA's
    ``B``, LayerScale, a relative-position bias table), not a signal dying. A layer is when its
    own weights are all within ``_ZERO_INIT`` of 0, or when it has none and is fed by such
    layers only (a dropout or activation behind them). Where such a layer does cut the signal,
    the layers it feeds vanish too, and are named with it. Weights are read once per layer
    judged, only for layers that would be found vanishing."""

    def __init__(self, model: Any, by_name: dict[str, LayerStats]) -> None:
        self.model, self.by_name = model, by_name
        self._known: dict[str, bool] = {}

    def by_design(self, layer: LayerStats) -> bool:
        if layer.name not in self._known:
            self._known[layer.name] = False  # (a cycle of inputs, which a forward cannot make)
            self._known[layer.name] = self._judge(layer)
        return self._known[layer.name]

    def _judge(self, layer: LayerStats) -> bool:
        try:
            module = self.model.get_submodule(layer.module)
        except AttributeError:
            return False
        params = [param for param in module.parameters() if param.is_floating_point() and param.numel()]
        if any(param.is_meta for param in params):
            return False
        if params:
            # aminmax: no copy of a large weight, as abs() would make
            extremes = [torch.aminmax(param.detach()) for param in params]
            return all(max(-float(low), float(high)) <= _ZERO_INIT for low, high in extremes)
        sources = [self.by_name[name] for name in layer.inputs_from if name in self.by_name]
        return bool(sources) and all(self.by_design(source) for source in sources)

    def fed_note(self, layer: LayerStats) -> str:
        """For a vanishing layer: the zero-initialised layers that feed it, if any."""
        sources = [
            name for name in layer.inputs_from if name in self.by_name and self.by_design(self.by_name[name])
        ]
        if not sources:
            return ""
        return f": fed by {', '.join(map(repr, sources))}, whose weights are ~0 (zero-initialised)"


def _dead_findings(layer: LayerStats, max_dead: float) -> list[Finding]:
    # "Never above zero" is dead only where values are rectified: a ReLU's output, a tensor a
    # ReLU (module or function) reads, values never below zero. Before SiLU, GELU or a sigmoid
    # (squeeze-excitation), and in logits, a negative value is an answer, not a dead unit.
    # (values never below zero are rectified if they are ever above it: an output that is 0
    # everywhere is a constant, which the std bound catches, not a dead layer)
    rectified = layer.rectified or (bool((layer.min >= 0).all()) and bool((layer.max > 0).any()))
    if layer.dead is None or not rectified or layer.dead <= max_dead:
        return []
    dead_units = round(layer.dead * (layer.channels or 0))
    note = f"{dead_units} of {layer.channels} channels never active"
    return [Finding(layer.name, layer.type, "dead", layer.dead, f"<= {max_dead:g}", None, note)]


def _fed_by(
    layer: LayerStats, previous: LayerStats | None, by_name: dict[str, LayerStats]
) -> list[LayerStats]:
    """What ``layer``'s std is compared with: the recorded layers whose outputs it was given;
    where none was recorded (a ReLU or an add between, not hooked), the layer before it if it is
    a sibling (the same parent): never a layer of another branch."""
    fed = [by_name[name] for name in layer.inputs_from if name in by_name]
    if fed:
        return fed
    if previous is not None and previous.module.rpartition(".")[0] == layer.module.rpartition(".")[0]:
        return [previous]
    return []


def _growth_findings(layer: LayerStats, fed: list[LayerStats], max_std_growth: float) -> list[Finding]:
    if not fed or _NORMALIZATION.search(layer.type):
        return []  # nothing to compare with; a norm's output scale is set by its own weights
    # the largest std among what it was given; after a constant output (a zero-initialised
    # residual BatchNorm) growth is undefined: NaN, not judged (the std bounds catch that)
    before = torch.stack([source.std for source in fed]).amax(dim=0)
    ratio = torch.where(before > 0, layer.std / before, math.nan)
    if not bool((ratio > max_std_growth).any()):
        return []
    value, batch = _worst(ratio, layer.batches, largest=True)
    note = f"vs {', '.join(source.name for source in fed)}"
    return [Finding(layer.name, layer.type, "std growth", value, f"<= {max_std_growth:g}", batch, note)]


def _first_nonfinite(layers: list, recorded: frozenset[str]) -> list[Finding]:  # type: ignore[type-arg]
    if not layers:
        return []
    ran = torch.stack([layer.ran for layer in layers])  # (series, batches)
    counts = torch.stack([layer.nonfinite for layer in layers])
    if "nonfinite" in recorded:
        bad = torch.nan_to_num(counts, nan=0.0) > 0
    else:
        # not counted: a NaN or an infinity still shows in every other statistic it feeds
        shown = [name for name in ("mean", "std", "min", "max") if name in recorded]
        if not shown:
            return []
        values = torch.stack([torch.stack([layer[name] for name in shown]) for layer in layers])
        bad = ran & (~torch.isfinite(values)).any(dim=1)
    if not bool(bad.any()):
        return []
    # the first batch with any non-finite value, then the first series in execution order
    column = int(bad.any(dim=0).nonzero()[0])
    row = int(bad[:, column].nonzero()[0])
    layer = layers[row]
    before = next((earlier for earlier in reversed(range(row)) if bool(ran[earlier, column])), None)
    if before is None:
        note = "first non-finite layer; the first hooked layer"
    else:
        note = f"first non-finite layer; previous layer {layers[before].name} was finite"
    observed = math.nan
    if "nonfinite" in recorded:
        observed = float(counts[row, column])
        total = int(sum(int(value) for value in torch.nan_to_num(counts[:, column]).tolist()))
        note += f"; {total} non-finite values in that batch"
    return [Finding(layer.name, layer.type, "nonfinite", observed, "0", int(layer.batches[column]), note)]


def _first_nonfinite_grad(grads: GradientStats, kept: torch.Tensor) -> dict[str, str]:
    """The note for the parameter whose gradient went non-finite first in backward order, in
    the first (kept) step that had one; keyed by its name. The finite gradient before it
    brackets the culprit: the NaN or infinity arose between their layers (often in a layer
    without parameters, such as a sqrt or a division)."""
    params = list(grads)
    if not params or not grads.num_steps:
        return {}
    # (params, steps): one pass over every step, not a host read per parameter and step
    bad = (torch.nan_to_num(torch.stack([param.nonfinite for param in params]), nan=0.0) > 0) & kept
    steps = bad.any(dim=0).nonzero().flatten().tolist()
    if not steps:
        return {}
    step = steps[0]
    row_of = {param.name: row for row, param in enumerate(params)}
    order = grads.backward_order(step)
    position = next(at for at, name in enumerate(order) if bool(bad[row_of[name], step]))
    where = f"first non-finite in backward at step {step}"
    if position == 0:
        return {order[0]: f"{where}; the first gradient of that backward"}
    return {order[position]: f"{where}; {order[position - 1]} before it was finite"}


def gradient_findings(
    grads: GradientStats,
    *,
    max_norm: float | None = None,
    min_norm: float | None = None,
    require_grad: bool = True,
    require_update: bool | None = None,
    exclude: ModuleSpec = None,
) -> list[Finding]:
    """Every broken gradient rule: parameters whose gradient norm went above ``max_norm``
    (exploding) or below ``min_norm`` (vanishing), non-finite gradients, (with
    ``require_grad``) trainable parameters that never got a gradient, and parameters that got
    one but never changed (``require_update``): with ``None``, judged only when an optimizer
    stepped on the model or changed some parameter inside the block, each finding saying why
    (left out of the param groups of the optimizer that stepped, a ``.grad`` gone before its
    ``step()``, zero gradients from the second step on; a group at lr 0 is a choice);
    ``True`` requires every parameter with a gradient to change; ``False`` does not look.

    >>> from torch import nn
    >>> from pytest_modelhooks import GradientStats
    >>> net = nn.ModuleDict({"used": nn.Linear(4, 2), "spare": nn.Linear(4, 2)})
    >>> with GradientStats(net) as grads:
    ...     net["used"](torch.randn(3, 4)).sum().backward()
    >>> for finding in gradient_findings(grads):
    ...     print(finding.layer, "|", finding.note)
    spare | unused: 'spare' never ran while recording (a branch not taken, or a layer never called)
    """
    given = {"max_norm": max_norm, "min_norm": min_norm}
    for bound in GRADIENT_BOUNDS:
        bound.validate(given[bound.name])
    check_order(min_norm, max_norm)
    steps = torch.arange(grads.num_steps)
    kept, found = _kept_steps(grads)
    first = _first_nonfinite_grad(grads, kept)
    excluded = excluded_names(grads.model, exclude)
    judged, unused = [], []
    for param in grads:
        kind = "parameter " + "x".join(str(dim) for dim in param.shape)
        exempt = _within(param.name.rpartition(".")[0], excluded)  # a non-finite gradient still counts
        judged += [] if exempt else [param.name]
        if require_grad and not param.got_grad and not exempt:
            unused.append(param.name)
            continue
        nonfinite = torch.where(kept, torch.nan_to_num(param.nonfinite, nan=0.0), 0.0)
        if bool((nonfinite > 0).any()):
            value, step = _worst(param.nonfinite, steps, largest=True)
            note = first.get(param.name, "")
            found.append(Finding(param.name, kind, "nonfinite grad", value, "0", step, note))
            continue
        if exempt:
            continue
        norm = torch.where(kept, param.norm, math.nan)  # NaN compares False: not judged
        if max_norm is not None and bool((norm > max_norm).any()):
            value, step = _worst(norm, steps, largest=True)
            found.append(Finding(param.name, kind, "grad norm", value, f"<= {max_norm:g}", step, "exploding"))
        if min_norm is not None and bool((norm < min_norm).any()):
            value, step = _worst(norm, steps, largest=False)
            found.append(Finding(param.name, kind, "grad norm", value, f">= {min_norm:g}", step, "vanishing"))
    found += unused_findings(grads, unused, judged)
    if require_update is not False:
        updates = _update_findings(grads, strict=require_update is True)
        found += [finding for finding in updates if not _within(finding.layer.rpartition(".")[0], excluded)]
    # the gradient where non-finite values began heads the table (a stable sort keeps the rest)
    found.sort(key=lambda finding: finding.layer not in first)
    return found


def _update_findings(grads: GradientStats, *, strict: bool) -> list[Finding]:
    """Parameters that got a gradient but never changed (see :meth:`GradientStats.updated`),
    each with the reason the optimizers seen stepping give (or, with none seen, a guess)."""
    updated = grads.updated()
    optimizers = grads.stepped_optimizers()
    if not optimizers and not any(updated.values()):
        if not strict or not any(flag is False for flag in updated.values()):
            return []  # no optimizer step inside the block (or values on meta): nothing to judge
        note = "no parameter changed: no optimizer step ran inside the `with` block"
        return [Finding("", type(grads.model).__name__, "update", math.nan, "a change", None, note)]
    holder = {name: optimizer.name for optimizer in optimizers for name in optimizer.params}
    zero_lr = {name for optimizer in optimizers for name in optimizer.zero_lr}
    names = list(dict.fromkeys(optimizer.name for optimizer in optimizers))
    stepped = " and ".join(names) + (
        ", the optimizer that stepped" if len(names) == 1 else ", the optimizers that stepped"
    )
    lost = grads.lost_before_step()
    frozen = "(if frozen on purpose, call requires_grad_(False) on it)"
    found = []
    for param in grads:
        if not param.got_grad or updated[param.name] is not False or param.name in zero_lr:
            continue  # (a learning rate of 0 is a choice)
        zero = bool((torch.nan_to_num(param.norm, nan=0.0) == 0).all())
        if param.name in lost:
            note = (
                f"its .grad was None when {lost[param.name]}.step() ran, so the step skipped it: "
                f"zero_grad() between backward() and step()?"
            )
        elif optimizers and param.name not in holder:
            note = f"got a gradient but is in none of the param groups of {stepped} {frozen}"
        elif zero:
            if not strict and grads.num_steps < 2:
                # one step: a zero-initialised partner gives none at first (LoRA's A while its B
                # is 0, a branch behind adaLN-Zero's gate); from the second step on it would
                continue
            note = "its gradient was zero at every step"
        elif optimizers:
            note = f"in a param group of {holder[param.name]} with a gradient, yet its step left it unchanged"
        else:
            note = f"got a gradient but never changed: is it in the optimizer's param groups? {frozen}"
        kind = "parameter " + "x".join(str(dim) for dim in param.shape)
        found.append(Finding(param.name, kind, "update", math.nan, "a change", None, note))
    return found


def no_batch_reason(stats: ActivationStats) -> str:
    """Why ``stats`` recorded no batch, in a sentence that says what to do (the finding that
    keeps ``check()`` from passing on nothing)."""
    if type(stats.model).__name__ == "OptimizedModule":
        return (
            "no batch was recorded: the model is torch.compile'd, and hooks registered after "
            "its first call never fire; create ActivationStats on the original module "
            "(model._orig_mod) before compiling it"
        )
    if not stats._forwards:
        return (
            f"no batch was recorded: {type(stats.model).__name__}'s forward did not run while "
            f"the hooks were on (run it inside the `with` block; a torch.compile'd copy "
            f"compiled before the hooks were added runs without them)"
        )
    if stats._saw_meta:
        return (
            "no batch was recorded: the model ran on the meta device, whose tensors have shapes "
            "but no values (move it to a real device, e.g. model.to_empty(device='cpu') and "
            "initialise it, to measure activations)"
        )
    if stats.train_only:
        return "no batch was recorded: train_only=True and the model ran only in eval mode"
    if not stats._any_call:
        hooked = ", ".join(name or "(model)" for name in stats.module_names[:8])
        more = f" and {len(stats.module_names) - 8} more" if len(stats.module_names) > 8 else ""
        return (
            f"no batch was recorded: {type(stats.model).__name__}'s forward ran, but none of the "
            f"hooked modules ({hooked}{more}) did; a graph from torch.export or torch.fx may "
            f"run their operations inline without calling them (select modules that run, or "
            f"record the eager model)"
        )
    return "no batch was recorded: no hooked module returned a floating-point tensor"
