from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import find, given, settings
from hypothesis.errors import InvalidArgument

from pytest_modelhooks import LayerError, model_sizes
from pytest_modelhooks.strategies import image_batches, input_sizes, sequential_models, token_batches
from tests import zoo


@settings(max_examples=30, deadline=None)
@given(size=input_sizes(channels=4, min_side=8, max_side=40, multiple_of=8, batch_size=2, dims=3))
def test_input_sizes_respect_every_bound(size: tuple[int, ...]) -> None:
    assert size[:2] == (2, 4) and len(size) == 5
    assert all(8 <= side <= 40 and side % 8 == 0 for side in size[2:])


@settings(max_examples=20, deadline=None)
@given(size=input_sizes(square=True, max_side=32))
def test_square_sizes(size: tuple[int, ...]) -> None:
    assert size[2] == size[3]


@settings(max_examples=20, deadline=None)
@given(batch=image_batches(channels=1, min_side=4, max_side=9, min_batch=2, max_batch=3, dtype=torch.float64))
def test_image_batches(batch: torch.Tensor) -> None:
    assert batch.dtype == torch.float64 and batch.shape[1] == 1 and 2 <= batch.shape[0] <= 3
    assert 4 <= batch.shape[2] <= 9 and 4 <= batch.shape[3] <= 9


@settings(max_examples=20, deadline=None)
@given(ids=token_batches(17, min_length=3, max_length=6))
def test_token_batches(ids: torch.Tensor) -> None:
    assert ids.dtype == torch.long and 3 <= ids.shape[1] <= 6
    assert int(ids.min()) >= 0 and int(ids.max()) < 17


@settings(max_examples=30, deadline=None)
@given(
    model=sequential_models(in_channels=2, max_layers=6, num_classes=3, min_side=6),
    side=input_sizes(min_side=6, max_side=20),
)
def test_generated_models_run_and_are_sized_exactly(
    model: torch.nn.Sequential, side: tuple[int, ...]
) -> None:
    sizes = model_sizes(model, side[2:])
    assert sizes[-1] == (1, 3)
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 2, *side[2:])).shape == (2, 3)


def test_the_global_rng_is_untouched() -> None:
    state = torch.get_rng_state()
    find(image_batches(), lambda batch: batch.shape[0] == 2)
    assert torch.equal(torch.get_rng_state(), state)


def test_find_the_smallest_input_a_unet_rejects() -> None:
    """The documented pattern: let Hypothesis shrink to the smallest failing input size."""

    def rejects(size: tuple[int, ...]) -> bool:
        try:
            model_sizes(zoo.UNet(), size[2:])
        except LayerError:
            return True
        return False

    smallest = find(input_sizes(min_side=8, max_side=64, square=True), rejects)
    assert smallest == (1, 3, 9, 9)  # two 2x poolings need a multiple of 4; 8 works, 9 is the first miss


@pytest.mark.parametrize(
    ("strategy", "kwargs", "match"),
    [
        (input_sizes, {"min_side": 0}, r"min_side=0 must be an int >= 1"),
        (input_sizes, {"min_side": 10, "max_side": 4}, r"max_side=4 is less than min_side=10"),
        (
            input_sizes,
            {"multiple_of": 16, "min_side": 17, "max_side": 31},
            r"no multiple of multiple_of=16 lies",
        ),
        (input_sizes, {"channels": 2.5}, r"channels=2.5 must be an int >= 1"),
        (input_sizes, {"batch_size": True}, r"batch_size=True must be an int >= 1"),
        (image_batches, {"min_batch": 3, "max_batch": 2}, r"max_batch=2 is less than min_batch=3"),
        (image_batches, {"dtype": torch.int64}, r"dtype=torch.int64 must be a floating-point dtype"),
        (token_batches, {"vocab_size": 0}, r"vocab_size=0 must be an int >= 1"),
        (
            token_batches,
            {"vocab_size": 5, "min_length": 9, "max_length": 3},
            r"max_length=3 is less than min_length=9",
        ),
        (sequential_models, {"num_classes": 0}, r"num_classes=0 must be an int >= 1"),
        (sequential_models, {"max_layers": -1}, r"max_layers=-1 must be an int >= 1"),
    ],
)
def test_bad_arguments_name_the_argument(strategy: Any, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        strategy(**kwargs)
