"""Does it learn: train a copy of the model on one small batch until it memorises it. A model that
cannot is broken (a frozen layer, a dead ReLU stack, gradients cleared before the step, a
learning rate of 0); the failure says which, from the gradient and activation statistics of the
run.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pytest_modelhooks.dependence.calls import OutputSpec
from pytest_modelhooks.errors import describe
from pytest_modelhooks.findings import Finding, HealthError, format_findings
from pytest_modelhooks.inputs import check_model, with_forward_kwargs
from pytest_modelhooks.stats.activations import ActivationStats
from pytest_modelhooks.stats.gradients import GradientStats
from pytest_modelhooks.tracing.state import rng_kept
from pytest_modelhooks.training.sanity import LossFn, scalar_loss, split_batch

__all__ = ["OverfitCurve", "check_overfits"]

#: ``optimizer=`` by name, each with the ``lr`` given
_OPTIMIZERS: dict[str, Callable[[list[nn.Parameter], float], torch.optim.Optimizer]] = {
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr),
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "sgd-momentum": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
}

#: ``step(model, batch, optimizer) -> loss``: one training step, as the user's loop takes it
TrainStep = Callable[[nn.Module, Any, torch.optim.Optimizer], torch.Tensor]


@dataclass(frozen=True)
class OverfitCurve:
    """The losses of an overfitting run, one per step, and the target it had to reach."""

    losses: list[float]
    target: float

    @property
    def first(self) -> float:
        return self.losses[0]

    @property
    def best(self) -> float:
        finite = [loss for loss in self.losses if math.isfinite(loss)]
        return min(finite) if finite else math.nan

    @property
    def last(self) -> float:
        return self.losses[-1]

    @property
    def reached(self) -> bool:
        return math.isfinite(self.last) and self.best <= self.target

    def __str__(self) -> str:
        best_step = self.losses.index(self.best) if math.isfinite(self.best) else None
        at = "" if best_step is None else f" at step {best_step}"
        return (
            f"loss {self.first:.4g} -> best {self.best:.4g}{at} -> last {self.last:.4g} after "
            f"{len(self.losses)} step(s), target <= {self.target:.4g}"
        )


def _make_optimizer(optimizer: Any, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if isinstance(optimizer, str):
        make = _OPTIMIZERS.get(optimizer.lower())
        if make is None:
            raise ValueError(
                f"optimizer={optimizer!r}: expected one of {', '.join(map(repr, _OPTIMIZERS))}, an optimizer "
                "class, or a function of the parameters"
            )
        return make(params, lr)
    if isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            "optimizer: an optimizer instance holds the user's parameters, and the check trains a copy; "
            "pass its class (torch.optim.AdamW), a name ('adamw') or a function of the parameters"
        )
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        return optimizer(params, lr=lr)  # type: ignore[call-arg]
    if callable(optimizer):
        made = optimizer(params)
        if not isinstance(made, torch.optim.Optimizer):
            raise TypeError(f"optimizer(params) must return a torch.optim.Optimizer, got {describe(made)}")
        return made
    raise TypeError(f"optimizer must be a name, an optimizer class or a callable, got {describe(optimizer)}")


def _default_step(
    loss_fn: LossFn, args: tuple[Any, ...], kwargs: dict[str, Any], output: OutputSpec
) -> TrainStep:
    def step(model: nn.Module, batch: Any, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        optimizer.zero_grad()
        loss = scalar_loss(loss_fn, model(*args, **kwargs), batch[1], "check_overfits", output)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        return loss

    return step


def check_overfits(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn = nn.functional.cross_entropy,
    *,
    steps: int = 500,
    optimizer: Any = "adam",
    lr: float = 1e-3,
    target: float | None = None,
    step: TrainStep | None = None,
    output: OutputSpec = None,
    seed: int = 0,
    **forward_kwargs: Any,
) -> OverfitCurve:
    """Train a copy of ``model`` on one ``(input, target)`` batch for up to ``steps`` steps and
    raise :class:`~pytest_modelhooks.findings.HealthError` unless its loss falls to ``target``
    (default: a tenth of the first loss). ``optimizer`` is a name (``"adam"``, ``"adamw"``,
    ``"sgd"``, ``"sgd-momentum"``, at ``lr``), an optimizer class (at ``lr``) or a function of
    the parameters; ``step(model, batch, optimizer) -> loss`` replaces the standard step
    (zero_grad, forward, ``loss_fn``, backward, step) with the user's own loop body. As in
    :func:`~pytest_modelhooks.training.sanity.check_loss_at_init`, cross-entropy and BCE get the
    output's logits (``output=`` picks another part), a language model's ``(batch, length,
    vocab)`` ones against ``(batch, length)`` targets.

    A failure comes with its reason: the loss curve (first, best, last), the parameters that got
    no gradient or never changed and why (gradients cleared before ``step()``, left out of the
    optimizer, a learning rate of 0), and the layers whose activations died or exploded along
    the way. The user's model, its optimizer and the RNG state are untouched. Returns the curve.

    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> curve = check_overfits(net, (torch.randn(16, 8), torch.randint(0, 4, (16,))), steps=200, lr=1e-2)
    >>> curve.reached
    True
    """
    __tracebackhide__ = True
    model = check_model(model)
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps > 0):
        raise ValueError(f"steps must be a positive int, got steps={steps!r}")
    if not (isinstance(lr, (int, float)) and lr >= 0):
        raise ValueError(f"lr must be a non-negative number, got lr={lr!r}")
    args, kwargs, _ = split_batch(model, batch, "check_overfits")
    args, kwargs = with_forward_kwargs(model, args, kwargs, forward_kwargs, "check_overfits")
    trained = copy.deepcopy(model).train()
    params = [param for param in trained.parameters() if param.requires_grad]
    if not params:
        raise ValueError(
            f"check_overfits: no parameter of {type(model).__name__} requires grad: nothing can learn"
        )
    made = _make_optimizer(optimizer, params, lr)
    train_step = step or _default_step(loss_fn, args, kwargs, output)
    losses: list[float] = []
    every = max(1, steps // 20)
    recorded = ActivationStats(trained, every=every), GradientStats(trained)
    with rng_kept(model, seed), recorded[0] as stats, recorded[1] as grads:
        for _ in range(steps):
            loss = train_step(trained, batch, made)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                got = describe(loss)
                raise ValueError(f"check_overfits: step() must return the loss, a scalar tensor, got {got}")
            losses.append(float(loss.detach()))
            limit = target if target is not None else losses[0] / 10
            if not math.isfinite(losses[-1]) or losses[-1] <= limit:
                break
    curve = OverfitCurve(losses, target if target is not None else losses[0] / 10)
    if curve.reached:
        return curve
    found = _reasons(trained, made, grads, stats, curve)
    message = f"overfit check failed: {type(model).__name__} does not memorise one batch: {curve}"
    if found:
        message += "\n" + format_findings(found, unit="step")
    else:
        message += "\nno parameter stuck and no layer dead or exploding: try more steps= or another lr="
    raise HealthError(message, found)


def _reasons(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    grads: GradientStats,
    stats: ActivationStats,
    curve: OverfitCurve,
) -> list[Finding]:
    """Why a run did not learn, from what it recorded."""
    found: list[Finding] = []
    rates = [group.get("lr") for group in optimizer.param_groups]
    if rates and all(isinstance(rate, (int, float)) and rate == 0 for rate in rates):
        note = "the optimizer's learning rate is 0: no step changes a parameter"
        found.append(Finding("", "optimizer", "lr", 0.0, "> 0", None, note))
    if not math.isfinite(curve.last):
        note = f"the loss became {curve.last} at step {len(curve.losses) - 1}"
        found.append(Finding("", "loss", "nonfinite", curve.last, "finite", len(curve.losses) - 1, note))
    frozen: dict[str, list[str]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            frozen.setdefault(name.rpartition(".")[0], []).append(name)
    for module, names in frozen.items():
        owner = model.get_submodule(module) if module else model
        verbs = ("requires", "it never trains") if len(names) == 1 else ("require", "they never train")
        note = f"frozen: {', '.join(names)} {verbs[0]} no grad, so {verbs[1]} (requires_grad_(True))"
        found.append(
            Finding(module, type(owner).__name__, "frozen", float(len(names)), "trainable", None, note)
        )
    # parameters without a gradient or left unchanged, and why (gradients cleared before the step...)
    found += grads.findings(require_update=True, require_grad=True)[:20]
    # layers that died or exploded along the way
    found += stats.findings(std=(1e-4, 1e3), max_dead=0.9, max_near_zero=0.99)[:20]
    return found
