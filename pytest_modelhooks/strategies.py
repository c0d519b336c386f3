"""Hypothesis strategies for model tests: input sizes, batches, token ids, random architectures.

Every strategy validates its arguments eagerly and names the bad one (``max_side=4`` is less
than ``min_side=8``). Tensors are built from a Hypothesis-drawn seed through a private
generator, so examples replay and shrink, and the global RNG is untouched.

A settings profile suited to torch (no deadline: the first forward pays for lazy
initialisation; few examples: each is a forward pass) is registered as ``"modelhooks"``::

    from hypothesis import settings
    settings.load_profile("modelhooks")

>>> from hypothesis import given
>>> @given(input_sizes(min_side=8, max_side=64, multiple_of=8))
... def test_sizes(size): ...
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from torch import nn

__all__ = ["image_batches", "input_sizes", "sequential_models", "token_batches"]

settings.register_profile(
    "modelhooks",
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgument(f"{name}={value!r} must be an int >= {minimum}")
    return value


def _ordered(low_name: str, low: int, high_name: str, high: int) -> None:
    if low > high:
        raise InvalidArgument(f"{high_name}={high!r} is less than {low_name}={low!r}")


def _sides(min_side: int, max_side: int, multiple_of: int) -> st.SearchStrategy[int]:
    _positive_int("min_side", min_side)
    _positive_int("max_side", max_side)
    _positive_int("multiple_of", multiple_of)
    _ordered("min_side", min_side, "max_side", max_side)
    first = -(-min_side // multiple_of)
    last = max_side // multiple_of
    if first > last:
        raise InvalidArgument(
            f"no multiple of multiple_of={multiple_of} lies between "
            f"min_side={min_side} and max_side={max_side}"
        )
    return st.integers(first, last).map(lambda step: step * multiple_of)


def input_sizes(
    *,
    channels: int = 3,
    min_side: int = 8,
    max_side: int = 128,
    multiple_of: int = 1,
    batch_size: int = 1,
    dims: int = 2,
    square: bool = False,
) -> st.SearchStrategy[tuple[int, ...]]:
    """Input shapes ``(batch_size, channels, *spatial)`` with ``dims`` spatial sides in
    ``[min_side, max_side]``, each a multiple of ``multiple_of``; ``square=True`` draws one side
    for all. Shrinks towards the smallest sides.

    >>> from hypothesis import find
    >>> find(input_sizes(min_side=16, max_side=64, multiple_of=16), lambda size: size[2] > 16)
    (1, 3, 32, 16)
    """
    _positive_int("channels", channels)
    _positive_int("batch_size", batch_size)
    _positive_int("dims", dims)
    sides = _sides(min_side, max_side, multiple_of)
    if square:
        return sides.map(lambda side: (batch_size, channels, *([side] * dims)))
    return st.tuples(*([sides] * dims)).map(lambda spatial: (batch_size, channels, *spatial))


def image_batches(
    *,
    channels: int = 3,
    min_side: int = 8,
    max_side: int = 64,
    multiple_of: int = 1,
    min_batch: int = 1,
    max_batch: int = 4,
    dtype: torch.dtype = torch.float32,
) -> st.SearchStrategy[torch.Tensor]:
    """Float tensors ``(B, C, H, W)`` with standard-normal values.

    >>> from hypothesis import find
    >>> find(image_batches(min_side=8, min_batch=2), lambda batch: True).shape
    torch.Size([2, 3, 8, 8])
    """
    _positive_int("min_batch", min_batch)
    _positive_int("max_batch", max_batch)
    _ordered("min_batch", min_batch, "max_batch", max_batch)
    if not dtype.is_floating_point:
        raise InvalidArgument(f"dtype={dtype} must be a floating-point dtype")
    sizes = input_sizes(channels=channels, min_side=min_side, max_side=max_side, multiple_of=multiple_of)
    return st.tuples(st.integers(min_batch, max_batch), sizes, st.integers(0, 2**32 - 1)).map(
        lambda drawn: _randn((drawn[0], *drawn[1][1:]), drawn[2]).to(dtype)
    )


def token_batches(
    vocab_size: int,
    *,
    min_length: int = 1,
    max_length: int = 64,
    min_batch: int = 1,
    max_batch: int = 4,
) -> st.SearchStrategy[torch.Tensor]:
    """Integer token ids ``(B, L)`` below ``vocab_size``.

    >>> from hypothesis import find
    >>> batch = find(token_batches(100, min_length=5), lambda batch: True)
    >>> batch.dtype, tuple(batch.shape)
    (torch.int64, (1, 5))
    """
    _positive_int("vocab_size", vocab_size)
    _positive_int("min_length", min_length)
    _positive_int("max_length", max_length)
    _ordered("min_length", min_length, "max_length", max_length)
    _positive_int("min_batch", min_batch)
    _positive_int("max_batch", max_batch)
    _ordered("min_batch", min_batch, "max_batch", max_batch)
    return st.tuples(
        st.integers(min_batch, max_batch), st.integers(min_length, max_length), st.integers(0, 2**32 - 1)
    ).map(lambda drawn: _randint(vocab_size, (drawn[0], drawn[1]), drawn[2]))


def _randn(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _randint(high: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


_LAYER_KINDS = ("conv", "batchnorm", "activation", "pool", "dropout")


@st.composite
def _sequential(
    draw: st.DrawFn,
    in_channels: int,
    max_layers: int,
    max_channels: int,
    num_classes: int | None,
    min_side: int,
) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = in_channels
    side = min_side  # the smallest input the model must still accept
    for _ in range(draw(st.integers(1, max_layers))):
        kind = draw(st.sampled_from(_LAYER_KINDS))
        if kind == "conv":
            out = draw(st.integers(1, max_channels))
            kernel = draw(st.sampled_from([1, 3]))
            stride = draw(st.integers(1, 2)) if side >= 4 else 1
            groups = draw(
                st.sampled_from([group for group in (1, 2, 4) if channels % group == 0 and out % group == 0])
            )
            layers.append(nn.Conv2d(channels, out, kernel, stride, padding=kernel // 2, groups=groups))
            channels, side = out, (side + stride - 1) // stride
        elif kind == "batchnorm":
            layers.append(nn.BatchNorm2d(channels))
        elif kind == "activation":
            layers.append(draw(st.sampled_from([nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh]))())
        elif kind == "pool" and side >= 2:
            layers.append(draw(st.sampled_from([nn.MaxPool2d, nn.AvgPool2d]))(2))
            side //= 2
        elif kind == "dropout":
            layers.append(nn.Dropout2d(draw(st.sampled_from([0.0, 0.1, 0.5]))))
    if not any(isinstance(layer, nn.Conv2d) for layer in layers):
        layers.insert(0, nn.Conv2d(in_channels, channels, 1))
    if num_classes is not None:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def sequential_models(
    *,
    in_channels: int = 3,
    max_layers: int = 8,
    max_channels: int = 16,
    num_classes: int | None = 10,
    min_side: int = 8,
) -> st.SearchStrategy[nn.Sequential]:
    """Random valid ``nn.Sequential`` image models: convolutions (strided, grouped), batch
    norms, activations, pools and dropout, then (with ``num_classes``) a pooled linear head.
    Every model accepts ``(B, in_channels, H, W)`` for any side ``>= min_side``.

    >>> from hypothesis import find
    >>> model = find(sequential_models(num_classes=5), lambda model: len(model) > 4)
    >>> model(torch.zeros(2, 3, 8, 8)).shape
    torch.Size([2, 5])
    """
    _positive_int("in_channels", in_channels)
    _positive_int("max_layers", max_layers)
    _positive_int("max_channels", max_channels)
    _positive_int("min_side", min_side)
    if num_classes is not None:
        _positive_int("num_classes", num_classes)
    return _sequential(in_channels, max_layers, max_channels, num_classes, min_side)
