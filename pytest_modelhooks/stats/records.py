"""The records of recorded statistics: :class:`LayerStats` per activation series,
:class:`ParamGradStats` per parameter, and the optimizers seen stepping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    pass


#: The per-batch statistics of an activation series, in the order of the rows of ``_values``.
STATISTICS = ("mean", "std", "near_zero", "nonfinite", "min", "max")


@dataclass(frozen=True)
class LayerStats:
    """The statistics of one series (one tensor a module returns) over the recorded batches.

    Each statistic is a float64 tensor with one value per recorded batch (NaN where the module
    did not run in that batch, see ``ran``, or where the statistic was not recorded). ``dead``
    is the fraction of channels (features) whose value was never above zero on any recorded
    sample, or None when there is no channel dimension. ``model_output`` marks a tensor that
    the model itself returned (logits, a decoder's last layer): its dead units are recorded
    but not judged by ``max_dead``, since an output is read as it is, not through a ReLU,
    unless it is rectified (never below zero: a backbone ending in a ReLU).

    >>> from torch import nn
    >>> from pytest_modelhooks import ActivationStats
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    >>> with ActivationStats(net) as stats:
    ...     for _ in range(3):
    ...         _ = net(torch.randn(16, 4))
    >>> layer = stats["0"]
    >>> layer.name, layer.type, layer.mean.shape, layer.ran.tolist()
    ('0', 'Linear', torch.Size([3]), [True, True, True])
    """

    name: str
    module: str
    type: str
    position: int  # order of first appearance: execution order
    batches: torch.Tensor
    ran: torch.Tensor  # per recorded batch: whether the module produced this series
    mean: torch.Tensor
    std: torch.Tensor
    near_zero: torch.Tensor
    nonfinite: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor
    dead: float | None
    channels: int | None
    hist: torch.Tensor | None = field(repr=False)
    model_output: bool = False
    #: whether the values are rectified: the output of a ReLU-family module, or a tensor that a
    #: ReLU-family module or function (``F.relu``) consumed; ``max_dead`` judges only these
    #: (and values never below 0)
    rectified: bool = False
    #: the recorded series whose tensors this module was given (by identity, within a batch):
    #: what ``max_std_growth`` compares it with
    inputs_from: tuple[str, ...] = ()
    #: the earlier series holding the very same tensor (a block, or the model, returning its
    #: last layer's output), or None; the bounds judge a tensor once, at its first series
    same_as: str | None = None

    def __getitem__(self, statistic: str) -> torch.Tensor:
        if statistic not in STATISTICS:
            raise KeyError(f"unknown statistic {statistic!r}; choose from {', '.join(STATISTICS)}")
        value: torch.Tensor = getattr(self, statistic)
        return value

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (NaN becomes None)."""
        data: dict[str, Any] = {
            "name": self.name,
            "module": self.module,
            "type": self.type,
            "batches": self.batches.tolist(),
            "dead": self.dead,
            "channels": self.channels,
            "model_output": self.model_output,
        }
        for statistic in STATISTICS:
            data[statistic] = [None if math.isnan(value) else value for value in self[statistic].tolist()]
        return data


# ====================================================================== gradients


@dataclass(frozen=True)
class ParamGradStats:
    """Gradient statistics of one parameter over the recorded backward passes (float64
    tensors, one value per step; NaN where the parameter got no gradient).

    >>> from torch import nn
    >>> from pytest_modelhooks import GradientStats
    >>> net = nn.Linear(4, 8)
    >>> with GradientStats(net) as grads:
    ...     net(torch.randn(3, 4)).sum().backward()
    >>> weight = grads["weight"]
    >>> weight.shape, weight.norm.shape, weight.got_grad
    ((8, 4), torch.Size([1]), True)
    """

    name: str
    module: str
    shape: tuple[int, ...]
    norm: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    max_abs: torch.Tensor
    nonfinite: torch.Tensor

    @property
    def got_grad(self) -> bool:
        """Whether a gradient arrived in any recorded step."""
        # the non-finite count is recorded whenever a gradient arrives, even a NaN one
        return bool((~torch.isnan(self.nonfinite)).any())


GRAD_STATISTICS = ("norm", "mean", "std", "max_abs", "nonfinite")


@dataclass(frozen=True)
class SteppedOptimizer:
    """An optimizer whose ``step()`` ran on some of the model's parameters while
    :class:`GradientStats` recorded: its class name, how many steps, the model's trainable
    parameters in its param groups (qualified names), and those of them in a group whose
    learning rate is 0.

    >>> from torch import nn
    >>> from pytest_modelhooks import GradientStats
    >>> net = nn.Linear(3, 1)
    >>> optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> with GradientStats(net) as grads:
    ...     net(torch.randn(4, 3)).sum().backward()
    ...     optimizer.step()
    >>> grads.stepped_optimizers()
    [SteppedOptimizer(name='SGD', steps=1, params=('weight', 'bias'), zero_lr=())]
    """

    name: str
    steps: int
    params: tuple[str, ...]
    zero_lr: tuple[str, ...]
