"""What a model holds that the package must leave as it found it: hooks (counted per module) and
every module's train/eval flag.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from pytest_modelhooks._torch import HOOK_DICTS


def hooks_by_module(model: nn.Module) -> dict[str, int]:
    """How many forward/backward hooks each module of ``model`` holds (modules with none
    omitted), keyed by qualified name (``""`` is the model itself).

    >>> net = nn.Sequential(nn.Linear(2, 2))
    >>> handle = net[0].register_forward_hook(lambda *args: None)
    >>> hooks_by_module(net)
    {'0': 1}
    >>> handle.remove()
    """
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        total = _own_hook_count(module)
        if total:
            counts[name] = total
    return counts


def count_hooks(model: nn.Module) -> int:
    """The number of forward/backward hooks registered on ``model`` and its submodules
    (a reused module counted once).

    >>> count_hooks(nn.Linear(2, 2))
    0
    """
    total = 0
    for module in model.modules():  # modules() yields a reused module once
        total += _own_hook_count(module)
    return total


def _own_hook_count(module: nn.Module) -> int:
    # torch keeps per-module hooks in these dicts; there is no public accessor.
    return sum(len(getattr(module, attribute, {}) or {}) for attribute in HOOK_DICTS)


def training_flags(model: nn.Module) -> dict[str, bool]:
    """The ``training`` flag of every module, keyed by qualified name.

    >>> training_flags(nn.Sequential(nn.Dropout()).eval())
    {'': False, '0': False}
    """
    return {name: module.training for name, module in model.named_modules()}


@contextmanager
def preserve_training_flags(
    model: nn.Module, *, eval_mode: bool = False, modules: Sequence[nn.Module] | None = None
) -> Iterator[None]:
    """Restore every module's train/eval flag when the block ends, also on an exception
    (``model.train(mode)`` alone would flatten mixed modes). With ``eval_mode=True`` the block
    runs with every module in eval mode. ``modules`` may pass ``list(model.modules())`` when the
    caller already has it (walking a 20,000-module model costs ~30 ms).

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    >>> net[1].eval()  # mixed modes
    Dropout(p=0.5, inplace=False)
    >>> with preserve_training_flags(net, eval_mode=True):
    ...     net.training
    False
    >>> net.training, net[1].training
    (True, False)
    """
    modules = list(model.modules()) if modules is None else modules
    flags = [module.training for module in modules]
    try:
        if eval_mode:
            _set_eval(modules)
        yield
    finally:
        for module, flag in zip(modules, flags, strict=True):
            if module.training != flag:
                # Set the flag itself: a train() override must not run its side effects a
                # second time.
                _set_training(module, flag)


def _set_training(module: nn.Module, flag: bool) -> None:
    if type(module).__setattr__ is nn.Module.__setattr__:
        # past Module.__setattr__, which is slow on 10,000s of modules
        object.__setattr__(module, "training", flag)
    else:
        # a ScriptModule keeps the flag in its C++ module: an instance attribute would shadow it
        module.training = flag


def _set_eval(modules: Sequence[nn.Module]) -> None:
    for module in modules:
        if type(module).train is not nn.Module.train:
            module.train(False)  # honour a custom train(), e.g. one that keeps BN frozen
        elif module.training:
            _set_training(module, False)
