"""timm's models, built from code with random weights: the checks that once gave false verdicts
on them at init agree with their defaults. Skipped where timm is not importable (see the
README's "Developing" section for an environment that has it)."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

from pytest_modelhooks import HealthError, model_memory  # noqa: E402
from pytest_modelhooks.divergence import first_divergence  # noqa: E402
from pytest_modelhooks.training import check_loss_at_init  # noqa: E402
from tests.helpers import untouched  # noqa: E402


def _built(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    return model, torch.randn(4, *model.pretrained_cfg["input_size"])


@pytest.mark.parametrize(
    ("name", "against"),
    [
        ("visformer_tiny", "bf16"),  # its attention turned on rounding with untrained batch norms
        ("visformer_tiny", "channels_last"),
        ("nfnet_l0", "bf16"),  # the whole forward differs by rounding built up, no layer by its own
        ("inception_v3", "channels_last"),
    ],
)
def test_models_at_init_agree_with_their_variants(name: str, against: str) -> None:
    model, batch = _built(name)
    with untouched(model):
        assert first_divergence(model, batch, against=against) == []


def test_a_view_of_a_batch_is_measured_as_the_slice_it_is() -> None:
    model, batch = _built("resnet18")
    assert model_memory(model, batch[:2]).to_dict() == model_memory(model, batch[:2], engine="real").to_dict()


def test_an_eval_mode_loss_at_init_says_the_batch_norms_never_saw_a_batch() -> None:
    model, batch = _built("inception_v3")
    labels = torch.randint(0, 1000, (4,))
    with pytest.raises(HealthError, match=r"the model is in eval mode, and its \d+ batch norms"):
        check_loss_at_init(model, (batch, labels))


def test_a_train_mode_loss_at_init_names_inceptions_head_and_its_scale() -> None:
    model, batch = _built("inception_v3")
    labels = torch.randint(0, 1000, (4,))
    with pytest.raises(HealthError, match=r"layer fc \(Linear, weight std 0\.1: 7\.8\dx PyTorch's default"):
        check_loss_at_init(model.train(), (batch, labels))
