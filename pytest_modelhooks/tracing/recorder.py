"""Recording a forward: every module call's shapes and flops, through torch's global module
hooks (two registrations in all), with a fast path through plain ``nn.Sequential`` containers
and stand-in forwards for common leaves on the meta engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from pytest_modelhooks._torch import (
    forget_global_hook,
    has_hooks,
    no_python_dispatch,
    only_these_global_hooks,
)
from pytest_modelhooks._tree import format_shape, shapes_of
from pytest_modelhooks.errors import LayerError, error_text
from pytest_modelhooks.inputs import layer_label
from pytest_modelhooks.tracing.dispatch import plain_meta
from pytest_modelhooks.tracing.records import Call
from pytest_modelhooks.tracing.shortcuts import ShapeRule, class_shape_rule, module_shortcut, own_forward


class Recorder:
    """Records every call of ``model``'s modules: order, input and output shapes, and which
    call failed.

    It uses torch's *global* module hooks (two registrations in all) and keeps only the calls of
    ``model``'s own modules: registering two handles on each of 20,000 modules costs more than
    the forward of a deep MLP, and the model's own hook dicts are never touched.
    """

    def __init__(self, known: dict[int, tuple[str, int]]) -> None:
        self.calls: list[Call] = []
        self.stack: list[Call] = []  # the calls running now, outermost first
        self.counts: dict[int, int] = {}
        self.known = known  # id(module) -> (qualified name, depth) for the model's modules
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self.handles = [register_module_forward_pre_hook(self.enter)]
        try:
            try:
                self.handles.append(register_module_forward_hook(self.leave, with_kwargs=True))
            except TypeError:  # torch < 2.2: global hooks see no keyword arguments
                self.handles.append(register_module_forward_hook(self._leave_without_kwargs))
        except BaseException:
            self.remove()
            raise

    def enter(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """A call of ``module`` begins (the global pre-hook)."""
        key = id(module)
        known = self.known.get(key)
        if known is None:  # a module of another model, or not registered in this one
            return
        count = self.counts[key] = self.counts.get(key, 0) + 1
        call = Call(known[0], module, known[1], len(self.calls), count, pending=args)
        self.calls.append(call)
        self.stack.append(call)

    def _leave_without_kwargs(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.leave(module, args, {}, output)

    def leave(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        """A call of ``module`` returned ``output`` (the global forward hook)."""
        # Not called when the forward raised: the failing calls stay unfinished, and the last
        # unfinished call in pre-order is the innermost layer that failed.
        stack = self.stack
        if stack and stack[-1].module is module:
            call = stack.pop()
        else:
            if id(module) not in self.known:
                return
            position = len(stack) - 1
            while position >= 0 and stack[position].module is not module:
                position -= 1  # calls above it raised and the exception was caught
            if position < 0:
                return
            call = stack[position]
            del stack[position:]
        call.pending = None
        try:
            call.input_shapes = (
                (args[0].shape,)
                if not kwargs and len(args) == 1 and type(args[0]) is torch.Tensor
                else _call_shapes(args, kwargs)
            )
            call.output_shapes = output.shape if type(output) is torch.Tensor else shapes_of(output)
        except RuntimeError:  # a nested tensor has no single size (checked only when one fails)
            call.input_shapes = _call_shapes(args, kwargs)
            call.output_shapes = shapes_of(output)
        call.finished = True
        if stack:
            stack[-1].flops += call.flops

    def record_answered(
        self, module: nn.Module, input_shape: torch.Size, output_shape: torch.Size, flops: int
    ) -> None:
        """Record a finished call of ``module`` whose output was answered from its input's
        shape alone (no forward ran, so no hook fired)."""
        key = id(module)
        name, depth = self.known[key]
        count = self.counts[key] = self.counts.get(key, 0) + 1
        call = Call(name, module, depth, len(self.calls), count, (input_shape,), output_shape, True, flops)
        self.calls.append(call)

    def add_flops(self, flops: int) -> None:
        """Attribute ``flops`` to the innermost running call."""
        if self.stack:
            self.stack[-1].flops += flops

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
            forget_global_hook(handle)
        self.handles.clear()

    def failing_call(self) -> Call | None:
        unfinished = [call for call in self.calls if not call.finished]
        if not unfinished:
            return None
        call = unfinished[-1]
        call.input_shapes = _call_shapes(call.pending or (), {})
        return call


def _call_shapes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor) and not args[0].is_nested:
        return (args[0].shape,)  # the common case, without the structure walk
    shapes = shapes_of(args)
    if kwargs:
        shapes = (*shapes, {key: shapes_of(value) for key, value in kwargs.items()})
    return shapes


@contextmanager
def shortcut_forwards(
    modules: Sequence[nn.Module], flops_sink: Callable[[int], None] | None, skip: set[int]
) -> Iterator[None]:
    """Give the common leaf modules (but those in ``skip``) a stand-in ``forward`` on the
    instance for the block (see :func:`~pytest_modelhooks.tracing.shortcuts.module_shortcut`),
    and always take it away again."""
    patched: list[nn.Module] = []
    try:
        for module in modules:
            if id(module) in skip:
                continue
            forward = module_shortcut(module, flops_sink)
            if forward is not None:
                # the instance dict, not setattr: nn.Module.__setattr__ costs ~2 us a call
                module.__dict__["forward"] = forward
                patched.append(module)
        yield
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)


def _meta_tensor(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    with no_python_dispatch():
        return torch.empty(shape, dtype=dtype, device="meta")


def _plain_call(cls: type[nn.Module]) -> bool:
    return (
        cls.__call__ is nn.Module.__call__
        and getattr(cls, "_wrapped_call_impl", None) is nn.Module._wrapped_call_impl
        and getattr(cls, "_call_impl", None) is nn.Module._call_impl
    )


def _plain_sequential(module: nn.Module) -> bool:
    cls = type(module)
    return (
        # getattr with a default: a scripted module's class raises on .forward
        getattr(cls, "forward", None) is nn.Sequential.forward
        and getattr(cls, "__iter__", None) is nn.Sequential.__iter__
        and "forward" not in module.__dict__
    )


class _Inliner:
    """Runs a plain ``nn.Sequential``'s children itself, recording their calls (see
    :func:`inline_sequentials`)."""

    def __init__(self, recorder: Recorder, *, count_flops: bool) -> None:
        self.recorder = recorder
        self.count_flops = count_flops
        self.rules: dict[int, ShapeRule] = {}  # per child answered by a shape rule
        self._class_rules: dict[type[nn.Module], ShapeRule | None] = {}
        self._plain: dict[type[nn.Module], bool] = {}

    def take_rules(self, sequential: nn.Module) -> None:
        """Note the shape rule of each child of ``sequential`` that has one (meta engine)."""
        for child in sequential._modules.values():
            if child is None:
                continue
            kind = type(child)
            if kind not in self._class_rules:  # once per class: the call must be torch's own, too
                self._class_rules[kind] = class_shape_rule(kind) if _plain_call(kind) else None
            rule = self._class_rules[kind]
            if rule is not None and id(child) in self.recorder.known and not own_forward(child):
                self.rules[id(child)] = rule

    def forward_of(self, sequential: nn.Sequential) -> Callable[[Any], Any]:
        def forward(input: Any) -> Any:
            if not only_these_global_hooks(1, 1):  # someone else hooks too: the ordinary call
                return nn.Sequential.forward(sequential, input)  # type: ignore[no-untyped-call]
            return self.run(sequential, input)

        return forward

    def run(self, sequential: nn.Sequential, input: Any) -> Any:
        # Over a run of children with shape rules, the value is only (shape, dtype):
        # ``virtual``; it becomes a meta tensor again where a child needs one.
        virtual = False
        shape, dtype = torch.Size(), torch.float32
        flops_total = 0
        for child in sequential._modules.values():
            # the hot path first: a hook-free child with a shape rule (its class's call was
            # checked plain when the rule was taken)
            rule = self.rules.get(id(child))
            if rule is not None and not has_hooks(child) and (virtual or plain_meta(input)):
                if not virtual:
                    shape, dtype = input.shape, input.dtype
                answered = rule(child, shape, dtype)
                if answered is not None:
                    out_shape, flops, returns_input = answered
                    flops = flops if self.count_flops else 0
                    self.recorder.record_answered(child, shape, out_shape, flops)
                    flops_total += flops
                    # a module that returns its input keeps the real tensor, if there is one
                    virtual = virtual or not returns_input
                    shape = out_shape
                    continue
            if virtual:
                input, virtual = _meta_tensor(shape, dtype), False
            input = self._call(child, input)
        if flops_total:
            self.recorder.add_flops(flops_total)  # the Sequential's own call
        return _meta_tensor(shape, dtype) if virtual else input

    def _call(self, child: nn.Module, input: Any) -> Any:
        """``child(input)``, as torch's fast path runs it (its ``forward`` alone, recorded) when
        nothing but the recorder would see the call."""
        cls = type(child)
        is_plain = self._plain.get(cls)
        if is_plain is None:
            is_plain = self._plain[cls] = _plain_call(cls)
        if not is_plain or has_hooks(child):
            return child(input)
        args = (input,)
        self.recorder.enter(child, args)
        output = child.forward(input)
        self.recorder.leave(child, args, {}, output)
        return output


@contextmanager
def inline_sequentials(
    modules: Sequence[nn.Module], recorder: Recorder, *, shape_rules: bool, count_flops: bool
) -> Iterator[set[int]]:
    """Let each plain ``nn.Sequential`` record its children's calls itself, for the block.

    A call through ``nn.Module.__call__`` with global hooks installed takes torch's slow path
    (~5 us a module before the hooks run). When the recorder's hooks are the only ones that
    would see a child's call, torch's own fast path would run just ``child.forward``, so
    calling the recorder and ``forward`` directly records exactly what the hooks would. Any
    other hook (the child's own, another global one), a compiled child, a class with its own
    ``__call__`` or JIT tracing takes the ordinary call.

    With ``shape_rules`` (the meta engine), children that have a
    :func:`~pytest_modelhooks.tracing.shortcuts.class_shape_rule` are answered from the shape and
    dtype of their input alone, and a run of them builds no tensor in between; their calls are
    recorded directly. Yields the ids of those children: they need no stand-in ``forward``.
    """
    inliner = _Inliner(recorder, count_flops=count_flops)
    patched: list[nn.Module] = []
    try:
        for module in modules:
            if _plain_sequential(module):
                module.__dict__["forward"] = inliner.forward_of(module)  # type: ignore[arg-type]
                patched.append(module)
                if shape_rules:
                    inliner.take_rules(module)
        yield set(inliner.rules)
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)


def layer_error(
    recorder: Recorder, model: nn.Module, error: BaseException, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> LayerError:
    call = recorder.failing_call()
    if call is not None and call.module is model and call.call_number == 1:
        # the recorder's pre-hook sees positional inputs only; the model's own are known
        call.input_shapes = _call_shapes(args, kwargs)
    if call is None:
        said = str(error) or error_text(error)  # (a bare assert: where it failed)
        return LayerError(
            f"{type(model).__name__} failed before any layer ran: {said}",
            "",
            type(model).__name__,
            None,
            error,
        )
    shapes = call.input_shapes
    shown = (
        format_shape(shapes[0]) if isinstance(shapes, tuple) and len(shapes) == 1 else format_shape(shapes)
    )
    message = f"{layer_label(call.name, call.module)} got input {shown}: {error_text(error)}"
    finished = [done for done in recorder.calls if done.finished and done.name]
    if not call.name and finished:
        last = finished[-1]
        message += f" (after layer '{last.name}' returned {format_shape(last.output_shapes)})"
    names = tuple(done.name for done in finished)
    return LayerError(message, call.name, type(call.module).__name__, shapes, error, names)
