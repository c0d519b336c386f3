"""Every private torch (and syrupy) name the package relies on, in one place.

torch gives no public way to do some of what the package must: see a module's hooks (to leave
the model as it was found), skip its slow hook path, read what ``torch.func`` wraps around a
tensor, trace on fake tensors. Each access below says what it is for, and :data:`REQUIRED`
lists them all, so that a torch upgrade that removes one fails one test naming the torch
version and the missing name (``tests/test_torch_internals.py``) instead of breaking features
one by one.

Not routed through here, as torch's own ``torch.func`` and state-dict code rely on them just
the same: a module's ``_parameters``, ``_buffers`` and ``_modules`` dicts (read directly on
hot paths: ``parameters(recurse=False)`` costs ~2 us a module), a tensor's ``_version``
counter, and ATen op names that begin with an underscore (``aten._softmax``: op names, not
Python attributes). They are in :data:`REQUIRED` too.

>>> HOOK_DICTS[0]
'_forward_hooks'
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import nn
from torch.nn.modules import module as _module_globals  # where torch keeps the global hooks
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "FAKE_TENSOR_LOGGER",
    "FUNCTORCH",
    "HAS_COMPILED_CALL",
    "HOOK_DICTS",
    "REQUIRED",
    "TorchDispatchMode",
    "at_backward_end",
    "compiled_call",
    "compiled_original",
    "dispatch_mode_active",
    "draws_at_random",
    "dynamo_explain",
    "dynamo_quiet",
    "dynamo_shapes",
    "fake_tensor_mode",
    "forget_global_hook",
    "graph_task_id",
    "has_hooks",
    "hook_count",
    "hook_entries",
    "is_compiling",
    "mark_dynamic",
    "missing",
    "no_python_dispatch",
    "only_these_global_hooks",
    "overload_packet",
    "recompilations",
    "recompile_limit",
    "rnn_flat_weights",
    "scaler_scale",
    "set_rnn_flat_weights",
    "symbolic_input_sizes",
    "syrupy_sanitized_name",
]

# --------------------------------------------------------------------------- hooks

#: The per-module hook dicts: counted to leave a model as it was found (hooks_by_module, the
#: hook guard) and checked to take torch's fast call path. torch has no public accessor.
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def hook_count(module: nn.Module) -> int:
    """How many hooks ``module`` itself holds (its submodules' not counted).

    >>> hook_count(nn.Linear(2, 2))
    0
    """
    return sum(len(getattr(module, attribute, None) or {}) for attribute in HOOK_DICTS)


def hook_entries(module: nn.Module) -> Iterator[tuple[str, int]]:
    """``(hook dict name, handle id)`` of every hook ``module`` itself holds."""
    for attribute in HOOK_DICTS:
        for hook_id in getattr(module, attribute, None) or {}:
            yield attribute, hook_id


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` holds any hook, or is compiled (``Module.compile()``): either way a
    call must go through ``nn.Module.__call__``, not straight to ``forward``."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or (HAS_COMPILED_CALL and module._compiled_call_impl is not None)
    )


def only_these_global_hooks(forward_pre: int, forward: int) -> bool:
    """Whether the process-wide module hooks are exactly ``forward_pre`` pre-hooks and
    ``forward`` forward hooks (a trace's own), no backward ones, and no JIT trace runs: then
    torch's fast path would call ``forward`` alone, and the tracer may do the same."""
    return (
        len(_module_globals._global_forward_pre_hooks) == forward_pre
        and len(_module_globals._global_forward_hooks) == forward
        and not _module_globals._global_backward_hooks
        and not _module_globals._global_backward_pre_hooks
        and not torch._C._get_tracing_state()
    )


def forget_global_hook(handle: Any) -> None:
    """Drop what a removed global forward hook leaves behind: torch's handle forgets the hook's
    ``with_kwargs`` flag, which would make every later compiled module warn about global hooks
    for the whole process."""
    getattr(_module_globals, "_global_forward_hooks_with_kwargs", {}).pop(handle.id, None)


# --------------------------------------------------------------------------- compile, functorch

#: Whether modules carry ``Module.compile()``'s slot (torch >= 2.2): read only where they do.
HAS_COMPILED_CALL = "_compiled_call_impl" in vars(nn.Module())


def compiled_call(module: nn.Module) -> Any:
    """The compiled forward ``Module.compile()`` installed on ``module``, or None."""
    return module._compiled_call_impl if HAS_COMPILED_CALL else None


def compiled_original(model: nn.Module) -> nn.Module | None:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) holds, or None."""
    original = getattr(model, "_orig_mod", None)
    if isinstance(original, nn.Module) and type(model).__name__ == "OptimizedModule":
        return original
    return None


#: ``torch._C._functorch``: tells a ``vmap``/``grad`` wrapper from a plain tensor and unwraps it,
#: so that hooks inside ``torch.func`` transforms read the whole batch.
FUNCTORCH: Any = getattr(torch._C, "_functorch", None)

#: Whether dynamo is tracing (torch >= 2.3; public since): a host read would break the graph.
is_compiling: Callable[[], bool] = getattr(torch.compiler, "is_compiling", lambda: False)

#: The id of the backward pass running on this thread, -1 outside backward: gradient
#: statistics end a step when a new backward starts.
graph_task_id: Callable[[], int] = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def at_backward_end(callback: Callable[[], None]) -> bool:
    """Run ``callback`` when the backward pass running now ends (before ``backward()``
    returns), through the autograd engine's final callbacks: gradient statistics reduce a
    backward's gradients together there. False, with nothing queued, where that is not
    possible (outside a backward, or an engine without the hook)."""
    engine = getattr(torch.autograd.Variable, "_execution_engine", None)
    queue = getattr(engine, "queue_callback", None)
    if queue is None or graph_task_id() == -1:
        return False
    try:
        queue(callback)
    except RuntimeError:  # "Final callbacks can only be installed during backward pass"
        return False
    return True


# --------------------------------------------------------------------------- dispatch

#: Skips Python dispatch for one allocation: outputs built by the trace's shortcuts must not
#: pass through its own dispatch mode again. (``TorchDispatchMode`` itself is imported above
#: from ``torch.utils._python_dispatch``, its only home.)
no_python_dispatch: Any = torch._C._DisableTorchDispatch


def dispatch_mode_active() -> bool:
    """Whether a Python dispatch mode (a ``TorchDispatchMode``) is on now: dynamo compiles
    nothing under one, and a compiled function first called there stays uncompilable."""
    return bool(torch._C._len_torch_dispatch_stack())


def overload_packet(func: Any) -> Any:
    """The op packet of an ATen overload (``aten.mm`` of ``aten.mm.default``): flop formulas
    and error messages are keyed by it."""
    return func._overloadpacket


def draws_at_random(func: Any) -> bool:
    """Whether an ATen op draws from a random generator (``bernoulli``, ``native_dropout``,
    ``rand``, ``normal``, ``randint``, ``multinomial``...): one of its overloads takes a
    ``Generator`` (``aten.rand.default`` does not, ``aten.rand.generator`` does)."""
    packet = func._overloadpacket
    for name in packet.overloads():
        schema = getattr(packet, name)._schema
        if any("Generator" in str(argument.type) for argument in schema.arguments):
            return True
    return False


#: The logger torch's fake tensors report kernel failures to, at ERROR level.
FAKE_TENSOR_LOGGER = "torch._subclasses.fake_tensor"


def fake_tensor_mode(**options: Any) -> Any:
    """A ``FakeTensorMode`` (imported on first use: it pulls in most of dynamo's support code)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(**options)


def storage_ref(tensor: torch.Tensor) -> Any:
    """A weak reference to ``tensor``'s storage (the C++ object, not the Python wrapper, which
    is made anew on every ``untyped_storage()`` call): ``.expired()`` says whether it was freed,
    ``.cdata`` identifies it while it lives. The memory report tracks live storages with it."""
    from torch.multiprocessing.reductions import StorageWeakRef

    return StorageWeakRef(tensor.untyped_storage())  # type: ignore[no-untyped-call]


#: ``storage_expired(ref.cdata)``: whether the storage of a :func:`storage_ref` was freed; the
#: C function behind ``StorageWeakRef.expired()``, without its two Python wrappers (a sweep of
#: the live storages after every operation calls it millions of times on a 7B model).
storage_expired = cast(Callable[[int], bool], torch.UntypedStorage._expired)


# --------------------------------------------------------------------------- dynamo


def dynamo_explain(function: Any, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, int]]:
    """``torch._dynamo.explain(function)(*args, **kwargs)``: dynamo's own account of a compile
    (``graph_break_count``, ``break_reasons`` with ``.reason`` and ``.user_stack`` frames), and
    every graph break dynamo counted, by reason (its ``counters["graph_break"]``): explain
    lists a break only where a graph was compiled before it, so a break before the first op
    is in the counts alone. Warnings kept out of the user's log; caches reset before and after."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    with dynamo_quiet():
        counters.clear()
        explained = torch._dynamo.explain(function)(*args, **kwargs)
        counted = {str(reason): int(count) for reason, count in counters["graph_break"].items()}
        counters.clear()
        return explained, counted


#: how ``torch.compile(dynamic=...)`` sets dynamo's shape config, for :func:`dynamo_explain`,
#: which takes no ``dynamic``: True assumes every size dynamic, False never marks one dynamic
DYNAMIC_CONFIG: dict[bool, dict[str, bool]] = {
    True: {"assume_static_by_default": False, "automatic_dynamic_shapes": True},
    False: {"assume_static_by_default": True, "automatic_dynamic_shapes": False},
}


@contextmanager
def dynamo_shapes(dynamic: bool | None) -> Iterator[None]:
    """dynamo's shape config as ``torch.compile(dynamic=dynamic)`` sets it (None: as it is),
    put back after."""
    import torch._dynamo

    if dynamic is None:
        yield
        return
    with torch._dynamo.config.patch(dict(DYNAMIC_CONFIG[dynamic])):
        yield


@contextmanager
def recompilations() -> Iterator[list[tuple[Any, list[str]]]]:
    """Each recompilation dynamo makes inside the block, as ``(code object, guard failure
    reasons)``, newest cache entry's reason first. dynamo computes the reasons once per
    recompilation and keeps them only in its (log-gated) recompile log, so the function that
    computes them is wrapped for the block."""
    import torch._dynamo.convert_frame

    convert_frame: Any = torch._dynamo.convert_frame  # a private name, not in its __all__
    original = convert_frame.get_and_maybe_log_recompilation_reasons
    seen: list[tuple[Any, list[str]]] = []

    def recording(cache_entries: Any, frame: Any, *args: Any, **kwargs: Any) -> Any:
        reasons = original(cache_entries, frame, *args, **kwargs)
        seen.append((frame.f_code, [str(reason) for reason in reasons]))
        return reasons

    convert_frame.get_and_maybe_log_recompilation_reasons = recording
    try:
        yield seen
    finally:
        convert_frame.get_and_maybe_log_recompilation_reasons = original


@contextmanager
def dynamo_quiet() -> Iterator[None]:
    """dynamo's warnings (graph breaks, the recompile limit) kept out of the user's log, and its
    caches reset before and after, so that what compiles inside neither reuses nor leaves
    anything another compile would see."""
    import logging
    import warnings

    import torch._dynamo

    # torch._guards logs an error with a stack when a guard cannot be made (a size marked
    # dynamic that the code specialises): the check reports it as a finding instead
    # and torch's structured trace (for tlparse) would fill a failing test's captured log
    logs = {
        "torch._dynamo": logging.ERROR,
        "torch._guards": logging.CRITICAL,
        "torch.__trace": logging.CRITICAL,
    }
    levels = {name: logging.getLogger(name).level for name in logs}
    for name, level in logs.items():
        logging.getLogger(name).setLevel(level)
    try:
        torch._dynamo.reset()
        with warnings.catch_warnings():
            # "Dynamo does not know how to trace the builtin ...": a break the check reports
            warnings.filterwarnings("ignore", module=r"torch\._dynamo")
            yield
    finally:
        torch._dynamo.reset()
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def mark_dynamic(tensor: torch.Tensor, dims: list[int]) -> None:
    """``torch._dynamo.mark_dynamic``: those sizes of ``tensor`` traced as symbols, an error
    where the code specialises one. It sets attributes on the tensor (the caller removes them)."""
    import torch._dynamo

    torch._dynamo.mark_dynamic(tensor, dims)


def recompile_limit() -> int:
    """How many times dynamo compiles one function before it runs it eagerly for good."""
    import torch._dynamo.config as config

    return int(getattr(config, "recompile_limit", None) or config.cache_size_limit)


def symbolic_input_sizes(program: Any) -> list[list[Any]]:
    """The sizes of an exported program's tensor user inputs, in order: each an int, or the
    sympy expression of a dynamic size (``s0``, ``2*s0``). The expressions live on the
    placeholders' fake tensors (``SymInt.node.expr``)."""
    from torch.export.graph_signature import InputKind

    users = {
        spec.arg.name for spec in program.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT
    }
    sizes = []
    for node in program.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" and node.name in users else None
        if isinstance(value, torch.Tensor):
            sizes.append(
                [dim.node.expr if isinstance(dim, torch.SymInt) else int(dim) for dim in value.shape]
            )
    return sizes


# --------------------------------------------------------------------------- module internals


def rnn_flat_weights(rnn: nn.RNNBase) -> list[Any]:
    """An RNN's own list of weight references, refreshed during its forward: a trace that swaps
    the weights must put this list back too."""
    return list(rnn._flat_weights)


def set_rnn_flat_weights(rnn: nn.RNNBase, weights: list[Any]) -> None:
    rnn._flat_weights = weights


def scaler_scale(scaler: Any) -> Any:
    """The device tensor behind ``GradScaler.get_scale()`` (reading it needs no host sync), or
    None where the scaler keeps none."""
    return getattr(scaler, "_scale", None)


# --------------------------------------------------------------------------- syrupy


def syrupy_sanitized_name(extension: Any, name: str) -> str:
    """The file name syrupy stores a snapshot named ``name`` under (characters a file name
    cannot hold removed). Raises AttributeError where this syrupy has no such helper."""
    sanitized: str = extension._sanitize_filename(name)
    return sanitized


# --------------------------------------------------------------------------- what is relied on


def _has_path(root: Any, path: str) -> bool:
    for part in path.split("."):
        if not hasattr(root, part):
            return False
        root = getattr(root, part)
    return True


def _module_has(name: str) -> bool:
    return name in vars(nn.Module()) or hasattr(nn.Module, name)


def _aten_has(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


#: ``(what, check)``: each private name above, and the module and tensor internals read
#: directly, with a check that this torch still has it.
REQUIRED: tuple[tuple[str, Callable[[], bool]], ...] = (
    *((f"nn.Module().{name}", lambda name=name: name in vars(nn.Module())) for name in HOOK_DICTS),
    *(
        (f"torch.nn.modules.module.{name}", lambda name=name: hasattr(_module_globals, name))
        for name in (
            "_global_forward_pre_hooks",
            "_global_forward_hooks",
            "_global_backward_hooks",
            "_global_backward_pre_hooks",
        )
    ),
    ("torch._C._get_tracing_state", lambda: _has_path(torch, "_C._get_tracing_state")),
    ("torch._C._DisableTorchDispatch", lambda: _has_path(torch, "_C._DisableTorchDispatch")),
    ("torch._C._len_torch_dispatch_stack", lambda: _has_path(torch, "_C._len_torch_dispatch_stack")),
    ("torch._C._functorch.get_unwrapped", lambda: _has_path(torch, "_C._functorch.get_unwrapped")),
    ("torch._C._functorch.maybe_get_bdim", lambda: _has_path(torch, "_C._functorch.maybe_get_bdim")),
    ("torch._C._current_graph_task_id", lambda: _has_path(torch, "_C._current_graph_task_id")),
    (
        "torch.autograd.Variable._execution_engine.queue_callback",
        lambda: _has_path(torch, "autograd.Variable._execution_engine.queue_callback"),
    ),
    (
        "torch._subclasses.fake_tensor.FakeTensorMode",
        lambda: _importable("torch._subclasses.fake_tensor", "FakeTensorMode"),
    ),
    ("nn.RNN()._flat_weights", lambda: hasattr(nn.RNN(1, 1), "_flat_weights")),
    ("torch.amp.GradScaler()._scale", lambda: "_scale" in vars(_grad_scaler())),
    ("aten.mm.default._overloadpacket", lambda: hasattr(torch.ops.aten.mm.default, "_overloadpacket")),
    ("aten.bernoulli.default._schema", lambda: draws_at_random(torch.ops.aten.bernoulli.default)),
    *(
        (f"nn.Module().{name}", lambda name=name: _module_has(name))
        for name in ("_parameters", "_buffers", "_modules")
    ),
    ("torch.Tensor._version", lambda: hasattr(torch.zeros(1), "_version")),
    ("torch.UntypedStorage._expired", lambda: hasattr(torch.UntypedStorage, "_expired")),
    ("torch._dynamo.explain", lambda: _importable("torch._dynamo", "explain")),
    ("torch._dynamo.utils.counters", lambda: _importable("torch._dynamo.utils", "counters")),
    (
        "torch._dynamo.convert_frame.get_and_maybe_log_recompilation_reasons",
        lambda: _importable("torch._dynamo.convert_frame", "get_and_maybe_log_recompilation_reasons"),
    ),
    (
        "torch._dynamo.config.assume_static_by_default",
        lambda: _importable("torch._dynamo.config", "assume_static_by_default"),
    ),
    (
        "torch.multiprocessing.reductions.StorageWeakRef",
        lambda: _importable("torch.multiprocessing.reductions", "StorageWeakRef"),
    ),
    *((f"torch.ops.aten.{name}", lambda name=name: _aten_has(name)) for name in ("_softmax", "_log_softmax")),
)


def _grad_scaler() -> Any:
    scaler_class = getattr(getattr(torch, "amp", None), "GradScaler", None)
    if scaler_class is not None:  # torch >= 2.3: a CPU scaler too
        return scaler_class("cpu")
    return torch.cuda.amp.GradScaler(enabled=torch.cuda.is_available())


def _importable(module: str, name: str) -> bool:
    import importlib

    return hasattr(importlib.import_module(module), name)


def missing() -> list[str]:
    """The names in :data:`REQUIRED` this torch lacks (empty when all are there).

    >>> missing()
    []
    """
    absent = []
    for what, check in REQUIRED:
        try:
            present = check()
        except Exception:  # a constructor that changed its signature counts as gone
            present = False
        if not present:
            absent.append(what)
    return absent
