"""The Python-side state of a model that a trace must put back.

Parameters and buffers are swapped and restored by the engines; but some modules keep tensors
in plain attributes, lists and dicts, and rewrite them in their forward: torchvision's
``AnchorGenerator.cell_anchors`` (a list moved to the input's device and dtype at every call),
a rotary embedding's cos/sin cache, an attention-bias cache made on first use. A trace on meta
or fake tensors would leave meta or fake tensors there, and every later forward of the model
would fail, or silently return fake results. :func:`python_state_kept` puts every such
attribute back as it was, also when the trace fails: the object it held, a list's or dict's
contents, and no attribute the forward added.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["buffers_kept", "python_state_kept", "rng_kept"]

#: What every ``nn.Module`` holds in its ``__dict__`` (the parameter, buffer, module and hook
#: dicts, ``training``...): put back by their own owners, or never tensors.
_MODULE_MACHINERY = frozenset(vars(nn.Module()))

_CONTAINERS = (list, dict, tuple, set)
# values that hold no tensor, skipped at once (nn.Linear's in_features, a module's flags)
_SCALARS = frozenset({int, float, bool, str, torch.dtype, torch.device, torch.Size})


def _holds_tensors(value: Any, depth: int = 0) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if depth > 2 or not isinstance(value, _CONTAINERS):
        return False
    items = value.values() if isinstance(value, dict) else value
    return any(_holds_tensors(item, depth + 1) for item in items)


def _contents(value: Any) -> Any:
    """A shallow copy of a mutable container's contents (to put back in place: the forward may
    have appended to the list or replaced a key), None for anything else."""
    if type(value) is list:
        return list(value)
    if type(value) is dict:
        return dict(value)
    if type(value) is set:
        return set(value)
    return None


def _restore_contents(value: Any, contents: Any) -> None:
    if contents is None:
        return
    if isinstance(value, list):
        value[:] = contents
    else:
        value.clear()
        value.update(contents)


@contextmanager
def python_state_kept(modules: Sequence[nn.Module]) -> Iterator[None]:
    """For the block: remember every module attribute outside torch's own machinery (and
    whether it holds tensors), and afterwards put back each one that holds tensors, remove
    those the block added that hold tensors, also on an exception.

    >>> class Cached(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.cache = None
    ...     def forward(self, x):
    ...         if self.cache is None:
    ...             self.cache = x * 2
    ...         return x + self.cache
    >>> model = Cached()
    >>> with python_state_kept([model]):
    ...     _ = model(torch.ones(2))
    >>> model.cache is None
    True
    """
    saved: list[tuple[dict[str, Any], str, Any, Any]] = []
    sizes: list[tuple[dict[str, Any], int]] = []
    machinery = _MODULE_MACHINERY
    for module in modules:  # a 20,000-module model walks this: type checks before isinstance
        state = module.__dict__
        sizes.append((state, len(state)))
        for key, value in state.items():
            kind = type(value)
            if kind in _SCALARS or key in machinery:
                continue
            if value is None or _holds_tensors(value):
                saved.append((state, key, value, _contents(value)))
    try:
        yield
    finally:
        for state, size in sizes:
            if len(state) > size:  # attributes added in the block come last (dicts keep order)
                for key in list(state)[size:]:
                    if _holds_tensors(state[key]):
                        del state[key]  # a cache made during the trace
        for state, key, value, contents in saved:
            state[key] = value
            _restore_contents(value, contents)


@contextmanager
def buffers_kept(model: nn.Module, *, when: bool = True) -> Iterator[None]:
    """Put every buffer's values back when the block ends, also on an exception (a forward
    that runs for real in train mode moves BatchNorm's running statistics). ``when=False``
    keeps nothing (and copies nothing).

    >>> net = nn.BatchNorm1d(2)
    >>> with buffers_kept(net):
    ...     _ = net(torch.randn(4, 2) + 5)
    >>> float(net.running_mean.abs().sum())
    0.0
    """
    saved = [(buffer, buffer.detach().clone()) for buffer in model.buffers()] if when else []
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


@contextmanager
def rng_kept(model: nn.Module, seed: int | None = None) -> Iterator[None]:
    """Torch's generators of the CPU and of every GPU the model is on put back after the
    block, seeded with ``seed`` for it when one is given (a check's runs draw the same numbers,
    and the user's stream is where it was).

    >>> net = nn.Linear(2, 2)
    >>> state = torch.random.get_rng_state()
    >>> with rng_kept(net, seed=0):
    ...     _ = torch.rand(3)
    >>> torch.equal(torch.random.get_rng_state(), state)
    True
    """
    cuda = sorted({t.device.index or 0 for t in (*model.parameters(), *model.buffers()) if t.is_cuda})
    with torch.random.fork_rng(devices=cuda):
        if seed is not None:
            torch.manual_seed(seed)
        yield


#: the batch norms whose running statistics a forward in train mode updates
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def untrained_batch_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The batch norms of ``model`` that keep running statistics and never saw a batch
    (``num_batches_tracked`` 0): in eval mode they normalise with mean 0 and variance 1, that
    is not at all, and a deep network at init grows its values layer on layer.

    >>> [name for name, _ in untrained_batch_norms(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))]
    ['1']
    """
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, BATCH_NORMS)
        and module.track_running_stats
        and isinstance(module.num_batches_tracked, torch.Tensor)
        and int(module.num_batches_tracked) == 0
    ]


def calibrate_batch_norms(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """Give each batch norm that never saw a batch the statistics of ``model(*args, **kwargs)``,
    as a training step would: one forward under ``no_grad`` with those norms alone in train
    mode, averaging over the batch (``momentum=None``). Returns their names; none where the
    forward fails in train mode (a batch of one), their buffers then as they were. The caller
    puts the buffers back (:func:`buffers_kept`); momentum and modes are put back here.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval()
    >>> with buffers_kept(net):
    ...     calibrate_batch_norms(net, (torch.randn(8, 2) + 5,), {})
    ...     bool(net[1].running_mean.abs().sum() > 0)
    ['1']
    True
    """
    norms = untrained_batch_norms(model)
    if not norms:
        return []
    saved: list[tuple[Any, Any, bool]] = [(module, module.momentum, module.training) for _, module in norms]
    before = [(buffer, buffer.detach().clone()) for _, module in norms for buffer in module.buffers()]
    try:
        for module, _, _ in saved:
            module.momentum = None  # (a cumulative average: after one batch, its statistics)
            module.train()
        with torch.no_grad():
            model(*args, **kwargs)
    except (RuntimeError, ValueError):  # "Expected more than 1 value per channel when training"
        with torch.no_grad():
            for buffer, value in before:
                buffer.copy_(value)
        return []
    finally:
        for module, momentum, training in saved:
            module.momentum = momentum
            module.train(training)
    return [name for name, _ in norms]
