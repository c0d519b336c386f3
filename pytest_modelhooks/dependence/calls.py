"""What the dependence checks share: a log of every module call with its inputs and outputs, a
model run with those inputs made differentiable, and the output to check.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pytest_modelhooks._tree import map_tensors, tensor_leaves
from pytest_modelhooks.hooks.select import ModuleSpec, hookable
from pytest_modelhooks.hooks.state import preserve_training_flags
from pytest_modelhooks.inputs import normalise_input, with_forward_kwargs

OutputSpec = str | int | Callable[[Any], torch.Tensor] | None


@dataclass
class ModuleCall:
    """One module call: its inputs and outputs that carry gradients."""

    name: str  # the module's qualified name ("" for the model)
    label: str  # the name, with " [call N]" from a module's second call on
    type: str
    module: nn.Module
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    # the shapes of the integer tensors it was given (token ids, or position buckets that no
    # sample's input reaches): where a module turns indices into floats, they say if it is batched
    index_shapes: list[tuple[int, ...]]


def _grad_leaves(obj: Any) -> list[torch.Tensor]:
    return [
        tensor
        for _, tensor in tensor_leaves(obj)
        if (tensor.is_floating_point() or tensor.is_complex()) and tensor.requires_grad
    ]


class CallLog:
    """Hooks on the ``named`` modules that log each call, in the order calls end: its name, its
    label (``" [call N]"`` from a module's second call on), the module, what ``on_enter`` made
    of its inputs and what ``on_exit`` made of its output. ``on_enter`` may also hand the
    module other inputs (it returns ``(args, kwargs, payload)``). While ``recording`` is off
    the inputs are still replaced, and nothing is logged. ``running`` holds the names of the
    modules running now, outermost first. A context manager: the hooks go when the block ends,
    also on an exception."""

    def __init__(
        self,
        named: list[tuple[str, nn.Module]],
        on_enter: Callable[[Any, Any], tuple[Any, Any, Any]],
        on_exit: Callable[[Any], Any],
    ) -> None:
        self.named, self.on_enter, self.on_exit = named, on_enter, on_exit
        self.calls: list[tuple[str, str, nn.Module, Any, Any]] = []
        self.recording = True
        self.running: list[str] = []
        self._counts: dict[str, int] = {}
        self._open: dict[int, list[Any]] = {}  # per module: its open calls' payloads
        self._handles: list[Any] = []

    def _enter(self, name: str, module: nn.Module, args: Any, kwargs: Any) -> tuple[Any, Any]:
        self.running.append(name)
        args, kwargs, payload = self.on_enter(args, kwargs)
        if self.recording:
            self._open.setdefault(id(module), []).append(payload)
        return args, kwargs

    def _exit(self, name: str, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if self.running:
            self.running.pop()
        if not self.recording:
            return
        self._counts[name] = self._counts.get(name, 0) + 1
        label = name if self._counts[name] == 1 else f"{name} [call {self._counts[name]}]"
        self.calls.append((name, label, module, self._open[id(module)].pop(), self.on_exit(output)))

    def __enter__(self) -> CallLog:
        try:
            for name, module in self.named:
                enter_hook = functools.partial(self._enter, name)
                self._handles.append(module.register_forward_pre_hook(enter_hook, with_kwargs=True))
                exit_hook = functools.partial(self._exit, name)
                self._handles.append(module.register_forward_hook(exit_hook, with_kwargs=True))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@contextmanager
def recorded_run(
    model: nn.Module,
    input: Any,
    forward_kwargs: dict[str, Any],
    modules: ModuleSpec,
    train: bool,
    caller: str,
) -> Iterator[tuple[Any, list[ModuleCall]]]:
    """Run the forward once with every selected module's inputs and outputs kept (they are in
    the autograd graph anyway), floating-point inputs and frozen parameters made to carry
    gradients, and keep it so while the block analyses it: activation checkpointing runs
    parts of the forward again during the backward, which must build the same graph. Then
    the model is left as it was: hooks, flags and ``requires_grad``.

    Each module gets its floating-point inputs through a view made as it is entered: the
    gradient with respect to that view is the module's own (partial) one. Taken at the
    tensors passed in, it would also run through the module's other inputs (a residual block
    handed both ``x`` and ``attention(x)``), and the attention's mixing would be blamed on it.
    """
    args, kwargs = normalise_input(input, "input", model)
    args, kwargs = with_forward_kwargs(model, args, kwargs, forward_kwargs, caller)

    def with_grad(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_floating_point() or tensor.is_complex():
            # not a leaf: a view of a leaf that requires grad may not be changed in place
            return tensor.detach().clone().requires_grad_(True).clone()
        return tensor

    def entered(tensor: torch.Tensor) -> torch.Tensor:
        if (tensor.is_floating_point() or tensor.is_complex()) and tensor.requires_grad:
            return tensor.view_as(tensor)
        return tensor

    def enter(call_args: Any, call_kwargs: Any) -> tuple[Any, Any, Any]:
        call_args, call_kwargs = map_tensors(call_args, entered), map_tensors(call_kwargs, entered)
        given = (call_args, call_kwargs)
        indices = [
            tuple(t.shape) for _, t in tensor_leaves(given) if not (t.is_floating_point() or t.is_complex())
        ]
        return call_args, call_kwargs, (_grad_leaves(given), indices)

    args, kwargs = map_tensors(args, with_grad), map_tensors(kwargs, with_grad)
    log = CallLog(hookable(model, modules, default="all"), enter, _grad_leaves)
    # frozen weights carry gradients for the check (a frozen embedding would hide everything
    # after it), restored after; autograd.grad writes no .grad, so nothing else changes
    frozen = [param for param in model.parameters() if not param.requires_grad and param.is_floating_point()]
    try:
        with preserve_training_flags(model, eval_mode=not train), torch.enable_grad(), log:
            for param in frozen:
                param.requires_grad_(True)
            output = model(*args, **kwargs)
            log.recording = False  # a recomputation in the backward replaces inputs alike
            calls = [
                ModuleCall(name, label, type(module).__name__, module, inputs, outputs, indices)
                for name, label, module, (inputs, indices), outputs in log.calls
            ]
            yield output, calls
    finally:
        for param in frozen:
            param.requires_grad_(False)


def select_output(output: Any, spec: OutputSpec, argument: str = "output") -> torch.Tensor:
    if spec is None:
        for _, tensor in tensor_leaves(output):
            if tensor.is_floating_point() or tensor.is_complex():
                return tensor
        raise ValueError(f"the model returned no floating-point tensor to check; pick one with {argument}=")
    if callable(spec):
        chosen = spec(output)
    elif isinstance(output, torch.Tensor):
        # AttributeError, as for an object without that field: the spec names nothing
        raise AttributeError(f"the model returned a tensor, which has no named outputs; leave {argument} out")
    elif isinstance(spec, int) and not isinstance(spec, bool):
        if not isinstance(output, (tuple, list)):
            raise AttributeError(
                f"{argument}={spec}: a position picks from a tuple or list output, and the model "
                f"returned {type(output).__name__}"
            )
        if not -len(output) <= spec < len(output):
            raise KeyError(f"{argument}={spec}: the model returned {len(output)} outputs")
        chosen = output[spec]
    elif not isinstance(spec, str):
        raise TypeError(f"{argument} must be a key, attribute name, position or callable, got {spec!r}")
    elif isinstance(output, Mapping):
        if spec not in output:
            raise KeyError(f"{spec!r} is not a key of the output; its keys: {', '.join(map(str, output))}")
        chosen = output[spec]
    else:
        field = getattr(output, spec, None)
        if field is None or callable(field):  # a method of the output is no output (Tensor.logit)
            fields = [name for name, value in vars(output).items() if not name.startswith("_")]
            raise AttributeError(
                f"{spec!r} is not a field of the output ({type(output).__name__}); its fields: "
                f"{', '.join(fields) or '(none)'}"
            )
        chosen = field
    if not isinstance(chosen, torch.Tensor) or not (chosen.is_floating_point() or chosen.is_complex()):
        raise ValueError(
            f"{argument}={spec!r} must select a floating-point tensor of the output, "
            f"got {type(chosen).__name__}"
            + (f" of {chosen.dtype}" if isinstance(chosen, torch.Tensor) else "")
        )
    return chosen


def check_indices(name: str, indices: Sequence[int] | None, size: int, what: str) -> list[int] | None:
    if indices is None:
        return None
    chosen = list(indices)
    bad = [index for index in chosen if not isinstance(index, int) or not -size <= index < size]
    if bad or not chosen:
        raise ValueError(f"{name}={indices!r}: need indices of the {size} {what} of the output")
    return [index % size for index in chosen]
