"""first_divergence and check_same: the layer where two runs part is named, healthy models agree
with the defaults, and stored fingerprints name the layer a change moved."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pytest_modelhooks import HealthError
from pytest_modelhooks.divergence import Fingerprints, check_same, fingerprints, first_divergence
from pytest_modelhooks.divergence.first import difference
from pytest_modelhooks.report.text import snapshot_text
from tests import zoo
from tests.architectures import GPT, Bugs, ConvNeXt
from tests.helpers import untouched


class HalfScale(nn.Module):
    """Right in float32, wrong under reduced precision: a scale applied in float16 overflows."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        if y.dtype != torch.float32:  # under autocast
            return (y.half() * 1e5).float()  # overflows past 65504
        return y * 1e5


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(8, 16), nn.GELU())
        self.scale = HalfScale()
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.scale(self.embed(x)))


def test_a_layer_wrong_only_under_bf16_is_named() -> None:
    torch.manual_seed(0)
    model = Net()
    with untouched(model):
        (finding,) = first_divergence(model, torch.randn(4, 8) * 10, against="bf16")
    assert (finding.layer, finding.layer_type, finding.statistic) == ("scale", "HalfScale", "diverges")
    assert "value(s) not finite" in finding.note and finding.observed == float("inf")
    with pytest.raises(HealthError, match=r"runs part against bf16: first at scale \(HalfScale\)"):
        check_same(model, torch.randn(4, 8) * 10, against="bf16")


@pytest.mark.parametrize("against", ["bf16", "fp16", "channels_last", "again"])
@pytest.mark.parametrize("name", ["resnetish", "unet", "transformer", "tied_lm", "mixed_modes"])
def test_healthy_zoo_models_agree_with_the_defaults(name: str, against: str) -> None:
    model, batch = zoo.build(name)
    if against == "again":
        model.eval()  # a second run in training mode draws other dropout masks, rightly named
    with untouched(model):
        assert first_divergence(model, batch, against=against) == []


@pytest.mark.parametrize("against", ["bf16", "channels_last"])
def test_healthy_transformer_and_convnext_agree(against: str) -> None:
    torch.manual_seed(0)
    assert first_divergence(GPT(), torch.randint(0, 64, (2, 16)), against=against) == []
    assert first_divergence(ConvNeXt(), torch.randn(2, 3, 32, 32), against=against) == []


class LastInFloat32(nn.Module):
    """BART's head in small: autocast runs the Linear in bf16, the bias added last (a float32
    buffer) and the LayerNorm return float32, holding bf16's rounding all the same."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.register_buffer("final_bias", torch.zeros(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x)) + self.proj(x) + self.final_bias


@pytest.mark.parametrize("against", ["bf16", "fp16"])
def test_a_float32_output_of_an_autocast_run_is_held_to_its_precision(against: str) -> None:
    torch.manual_seed(0)
    model, batch = LastInFloat32(), torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16 if against == "bf16" else torch.float16):
        assert model(batch).dtype == torch.float32  # (what the tolerance once came from)
    assert first_divergence(model, batch, against=against) == []
    assert first_divergence(Net(), torch.randn(4, 8) * 10, against=against)[0].layer == "scale"  # still seen


class ToyCache:
    """transformers' key/value cache in small: each attention call appends its keys."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []

    def get_seq_length(self) -> int:
        return sum(key.shape[1] for key in self.keys)


class CachedAttention(nn.Module):
    def forward(self, x: torch.Tensor, cache: ToyCache) -> torch.Tensor:
        cache.keys.append(x)
        return x * cache.get_seq_length()  # what it returns depends on what the cache held


class WithCache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = CachedAttention()
        self.scale = HalfScale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = ToyCache()
        return self.scale(self.attn(self.attn(x, cache=cache), cache=cache))


def test_a_module_given_a_cache_is_run_again_on_the_cache_as_it_stood() -> None:
    # run again on the cache the whole forward grew, the attention's calls would differ too
    torch.manual_seed(0)
    model = WithCache()
    batch = torch.randn(4, 16) * 10
    with untouched(model):
        found = first_divergence(model, batch, against="bf16")
    assert [finding.layer for finding in found] == ["scale"]


class Deep(nn.Module):
    """Eight attention layers given one cache in turn, as a decoder's layers are."""

    def __init__(self, layers: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CachedAttention() for _ in range(layers))
        self.scale = HalfScale()

    def forward(self, x: torch.Tensor, cache: ToyCache) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, cache=cache)
        return self.scale(x)


def test_a_cache_given_to_every_layer_is_held_once_by_the_recording() -> None:
    from pytest_modelhooks.divergence.calls import record_calls

    cache = ToyCache()
    cache.keys.append(torch.randn(4, 16))  # an earlier step's keys
    given = cache.keys[0].clone()
    calls = record_calls(Deep(), (torch.randn(4, 16), cache), {})
    held = {
        key.untyped_storage().data_ptr()
        for call in calls
        for value in (*call.args, *call.kwargs.values())
        if isinstance(value, ToyCache)
        for key in value.keys
    }
    # the layers' calls saw the cache with 1, 2, ... 8 keys in it (and the model's call with 1):
    # 37 keys in the copies, 8 distinct ones (the given key, then the first seven layers')
    seen = [
        len(value.keys) for call in calls for value in call.kwargs.values() if isinstance(value, ToyCache)
    ]
    assert seen == list(range(1, 9))
    assert len(held) == 8
    assert torch.equal(cache.keys[0], given) and len(cache.keys) == 1  # the caller's as it was
    # each copy is the cache as it stood: a later layer's key is not in an earlier call's copy
    stored = [value for call in calls for value in call.kwargs.values() if isinstance(value, ToyCache)]
    assert torch.equal(stored[0].keys[0], given)


def test_a_tensor_changed_in_place_between_calls_is_copied_again() -> None:
    from pytest_modelhooks.divergence.calls import record_calls

    class Overwrites(nn.Module):  # a static cache: keys written in place, as index_copy_ does
        def forward(self, x: torch.Tensor, cache: ToyCache) -> torch.Tensor:
            cache.keys[0].add_(1.0)
            return x + cache.keys[0]

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = Overwrites(), Overwrites()

        def forward(self, x: torch.Tensor, cache: ToyCache) -> torch.Tensor:
            return self.second(self.first(x, cache=cache), cache=cache)

    cache = ToyCache()
    cache.keys.append(torch.zeros(2, 3))
    calls = record_calls(Twice(), (torch.zeros(2, 3), cache), {})
    stored = {call.name: call.kwargs["cache"].keys[0] for call in calls if call.name}
    assert float(stored["first"].max()) == 0.0 and float(stored["second"].min()) == 1.0


def test_the_tensors_in_a_cache_are_converted_with_its_copy() -> None:
    # a cache has no .to(): run again on CUDA, each layer's keys and values go with the copy
    transformers = pytest.importorskip("transformers")
    from pytest_modelhooks.divergence.calls import fresh_caches

    cache = transformers.DynamicCache()
    weight = torch.ones(1, requires_grad=True)
    for layer in range(2):  # (filled with gradients on: tensors autograd made)
        cache.update(torch.randn(1, 2, 5, 4) * weight, torch.randn(1, 2, 5, 4) * weight, layer)
    call = (torch.ones(1), cache)
    _, fresh = fresh_caches(call, convert=lambda t: t.double())
    assert fresh is not cache and fresh.get_seq_length() == 5
    assert [(layer.keys.dtype, layer.values.dtype) for layer in fresh.layers] == [(torch.float64,) * 2] * 2
    assert {layer.keys.dtype for layer in cache.layers} == {torch.float32}  # the recorded one as it was
    assert torch.equal(fresh.layers[1].keys, cache.layers[1].keys.detach().double())
    assert fresh.layers[1].keys.grad_fn is None


def test_differences_that_build_up_inside_a_block_blame_no_layer() -> None:
    # each layer of the refactor is within tolerance (3e-6 relative); ten of them are not:
    # the blocks differ, but not by their own code, so nothing is named
    torch.manual_seed(0)

    def deep() -> nn.Sequential:
        def block() -> nn.Sequential:
            layers = [nn.Linear(16, 16, bias=False) for _ in range(10)]
            for layer in layers:
                nn.init.orthogonal_(layer.weight)
            return nn.Sequential(*layers)

        return nn.Sequential(block(), block())

    before, after = deep(), deep()
    after.load_state_dict(before.state_dict())
    with torch.no_grad():
        for param in after.parameters():
            param.mul_(1 + 3e-6)
    batch = torch.randn(4, 16)
    assert not torch.allclose(before(batch), after(batch), rtol=1.3e-6, atol=1e-5)  # (they part)
    with untouched(before), untouched(after):
        assert first_divergence(before, batch, against=after) == []
    # a block whose own code changed is still named, inside the blocks that differ by it
    after[1].forward = lambda x: nn.Sequential.forward(after[1], x) * 1.01  # type: ignore[method-assign]
    (finding,) = first_divergence(before, batch, against=after)
    assert finding.layer == "1"


def test_the_modules_standing_in_for_their_outputs_get_their_own_forward_back() -> None:
    # two layers each within tolerance of the refactor's, the model they make up beyond it
    torch.manual_seed(0)
    before = nn.Sequential(nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False))
    for layer in before:
        nn.init.orthogonal_(layer.weight)
    after = copy.deepcopy(before)
    with torch.no_grad():
        for param in after.parameters():
            param.mul_(1 + 3e-6)
    forward = after[0].forward
    after[0].forward = forward  # type: ignore[method-assign]  # (an instance's own forward)
    batch = torch.randn(64, 16)
    assert difference(before(batch), after(batch), None, None).beyond  # (the model parts)
    with untouched(before), untouched(after):
        assert first_divergence(before, batch, against=after) == []
    assert vars(after[0])["forward"] is forward and "forward" not in vars(after[1])


class Twice(nn.Module):
    """One layer called twice: its stand-ins are handed out in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(16, 16, bias=False)
        nn.init.orthogonal_(self.layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.layer(x))


def test_a_module_called_twice_inside_a_block_stands_in_for_each_call() -> None:
    torch.manual_seed(0)
    before = Twice()
    after = copy.deepcopy(before)
    with torch.no_grad():
        after.layer.weight.mul_(1 + 3e-6)
    batch = torch.randn(64, 16)
    assert difference(before(batch), after(batch), None, None).beyond  # (the block parts)
    with untouched(before), untouched(after):
        assert first_divergence(before, batch, against=after) == []
    after.forward = lambda x: after.layer(after.layer(x)) * 1.01  # type: ignore[method-assign]
    assert [finding.layer for finding in first_divergence(before, batch, against=after)] == [""]


def test_a_forward_that_fails_after_the_batch_norms_leaves_them_as_they_were() -> None:
    class Fails(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise TypeError("the model's own bug")

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Fails()).eval()
    with untouched(model), pytest.raises(TypeError, match="the model's own bug"):
        first_divergence(model, torch.randn(2, 3, 8, 8), against="bf16")
    assert model[1].momentum == 0.1 and not model[1].training


class PeakedAttention(nn.Module):
    """Attention over an image's positions: smooth on normalised values, a one-hot softmax,
    where any rounding moves the peak, on values in the hundreds."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)
        return torch.softmax(tokens @ tokens.transpose(1, 2) / tokens.shape[-1], -1) @ tokens


def normed_attention() -> nn.Sequential:
    """Each convolution multiplies the std by ~3, which only batch norms that work undo."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1)]
    for _ in range(6):
        conv = nn.Conv2d(8, 8, 3, padding=1)
        with torch.no_grad():
            conv.weight.mul_(8)
        layers += [conv, nn.BatchNorm2d(8), nn.ReLU()]
    return nn.Sequential(*layers, PeakedAttention()).eval()


@pytest.mark.parametrize("against", ["bf16", "fp16"])
def test_batch_norms_that_never_saw_a_batch_take_its_statistics_first(against: str) -> None:
    # in eval mode at init a batch norm normalises nothing: values reach ~160, and the
    # attention's softmax turns on rounding; normalised, as in a training step, it agrees
    model, batch = normed_attention(), torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert float(model[:-1](batch).std()) > 100
    with untouched(model):
        assert first_divergence(model, batch, against=against) == []
    assert all(norm.momentum == 0.1 for norm in model.modules() if isinstance(norm, nn.BatchNorm2d))
    for norm in model.modules():  # statistics of its own, though they are the initial ones
        if isinstance(norm, nn.BatchNorm2d):
            norm.num_batches_tracked += 1
    (finding,) = first_divergence(model, batch, against=against)
    assert finding.layer_type == "PeakedAttention"


def test_a_refactor_with_untrained_batch_norms_takes_the_same_statistics() -> None:
    # calibrated on its own activations, each of the refactor's norms would differ by a little
    model, twin, batch = normed_attention(), normed_attention(), torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        twin[1].weight.mul_(1.001)  # the refactor's one change
    with untouched(model), untouched(twin):
        found = first_divergence(model, batch, against=twin)
    assert [finding.layer for finding in found] == ["1"]


def test_dropout_left_on_in_eval_is_named_by_a_second_run() -> None:
    torch.manual_seed(0)
    model = GPT(Bugs(eval_dropout=True)).eval()
    found = first_divergence(model, torch.randint(0, 64, (2, 16)), against="again")
    assert found and found[0].layer == "blocks.0.attn"
    assert "inside blocks.0" in found[0].note
    assert first_divergence(GPT().eval(), torch.randint(0, 64, (2, 16)), against="again") == []


def test_a_refactor_that_changes_one_layer_is_named() -> None:
    torch.manual_seed(0)
    before = Net()
    after = Net()
    after.load_state_dict(before.state_dict())
    after.embed[1] = nn.ReLU()  # the refactor changed an activation
    (finding,) = first_divergence(before, torch.randn(4, 8), against=after)
    assert (finding.layer, finding.layer_type) == ("embed.1", "GELU")
    assert "against another Net" in finding.note


def test_the_compiled_model_agrees_with_eager() -> None:
    model, batch = zoo.build("mlp")
    assert first_divergence(model, batch, against="compiled") == []


def test_stored_fingerprints_name_the_first_layer_a_change_moved() -> None:
    torch.manual_seed(0)
    model = Net()
    batch = torch.randn(4, 8)
    stored = Fingerprints.from_text(snapshot_text(fingerprints(model, batch)))  # as a snapshot keeps it
    assert len(stored) == 7 and first_divergence(model, batch, against=stored) == []
    assert repr(stored) == "<Fingerprints of Net: 7 calls>"
    with torch.no_grad():
        model.scale.proj.bias.add_(0.01)  # a change in one layer
    (finding,) = first_divergence(model, batch, against=stored)
    assert (finding.layer, finding.layer_type) == ("scale.proj", "Linear")


def test_bad_against_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="against must be one of 'compiled', 'bf16'"):
        first_divergence(Net(), torch.randn(2, 8), against="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="against='cuda': CUDA is not available here"):
            first_divergence(Net(), torch.randn(2, 8), against="cuda")


def test_a_module_called_twice_is_compared_call_by_call() -> None:
    import copy

    before, batch = zoo.build("reused")
    after = copy.deepcopy(before)
    with torch.no_grad():
        after.shared.bias.add_(0.5)  # the refactor changed the layer both calls share
    assert first_divergence(before, batch, against="bf16") == []
    found = first_divergence(before, batch, against=after)
    assert found[0].layer == "shared" and "(call 2)" not in found[0].note  # its first call starts it
    twice = first_divergence(before, batch, against="again")
    assert twice == []


@pytest.mark.parametrize("name", ["dict_out", "tuple_out"])
def test_nested_outputs_are_compared_and_fingerprinted_leaf_by_leaf(name: str) -> None:
    model, batch = zoo.build(name)
    assert first_divergence(model, batch, against="fp16") == []
    stored = Fingerprints.from_text(snapshot_text(fingerprints(model, batch)))
    assert len(stored.prints[0].values) == 2  # the model's two outputs, each with its numbers
    assert first_divergence(model, batch, against=stored) == []
