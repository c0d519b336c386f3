"""Hugging Face models built from a config (no download); skipped without transformers."""

from __future__ import annotations

import pytest
import torch

from pytest_modelhooks import ActivationStats, Hook, count_hooks, model_sizes, model_summary
from tests.helpers import untouched

transformers = pytest.importorskip("transformers")


@pytest.fixture
def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def test_summary_counts_the_tied_head_once(gpt2: torch.nn.Module) -> None:
    ids = torch.randint(0, 100, (1, 10))
    with untouched(gpt2):
        summary = model_summary(gpt2, input_data={"input_ids": ids})
    assert summary.total_params == sum(p.numel() for p in gpt2.parameters())
    assert summary.output_shapes["logits"] == (1, 10, 100)


def test_model_output_keeps_its_type_through_detach(gpt2: torch.nn.Module) -> None:
    ids = torch.randint(0, 100, (1, 6))
    with Hook(gpt2, lambda module, args, out: out, cpu=True) as hook:
        expected = gpt2(input_ids=ids)
    assert type(hook.stored) is type(expected)
    assert hook.stored.logits.shape == (1, 6, 100) and not hook.stored.logits.requires_grad
    assert count_hooks(gpt2) == 0


def test_sizes_and_stats_name_model_output_fields(gpt2: torch.nn.Module) -> None:
    ids = torch.randint(0, 100, (2, 8))
    sizes = model_sizes(gpt2, input={"input_ids": ids}, modules=["transformer.h.0", "lm_head"])
    assert sizes["lm_head"] == (2, 8, 100)
    with ActivationStats(gpt2, modules=["", "lm_head"]) as stats:
        gpt2(input_ids=ids)
    assert "logits" in stats.series_names and "lm_head" in stats.series_names


def _small(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A two-layer, 64-wide model of each family, from a config, and an input for it."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 500, (1, 12))
    shared = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
    grouped = {**shared, "num_key_value_heads": 2, "vocab_size": 500}
    if name == "bert":
        return transformers.BertModel(transformers.BertConfig(**shared, vocab_size=500)), tokens
    if name == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**grouped)), tokens
    if name == "vit":
        config = transformers.ViTConfig(**shared, image_size=32, patch_size=8)
        return transformers.ViTModel(config), torch.randn(1, 3, 32, 32)
    if name == "swin":
        windows = {"embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2], "window_size": 4}
        config = transformers.SwinConfig(**windows, image_size=32, patch_size=4, num_labels=10)
        return transformers.SwinForImageClassification(config), torch.randn(1, 3, 32, 32)
    if name == "qwen2-moe":
        config = transformers.Qwen2MoeConfig(
            **grouped,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
        )
        return transformers.Qwen2MoeForCausalLM(config), tokens
    config = transformers.MixtralConfig(**grouped, num_local_experts=4)
    return transformers.MixtralForCausalLM(config), tokens


@pytest.mark.parametrize("name", ["bert", "llama", "vit", "mixtral", "qwen2-moe"])
def test_auto_engine_summaries_equal_a_real_forwards(name: str) -> None:
    # attention runs fused on the CPU and decomposed on meta; MoE experts run as one grouped
    # matmul, whose meta kernel takes bfloat16 only (the meta engine builds its output itself)
    model, batch = _small(name)
    model.eval()
    with untouched(model):
        auto = model_summary(model, input_data=batch)
        real = model_summary(model, input_data=batch, engine="real")
    assert auto.layers == real.layers and auto.mult_adds == real.mult_adds
    assert auto.total_params == sum(p.numel() for p in model.parameters())
    assert auto.engine == "meta"
    if name in ("mixtral", "qwen2-moe"):
        # the experts' matmuls are counted: 3 of them per routed token and expert, each
        # hidden x moe-width (a grouped matmul has no torch flop formula)
        experts = next(layer for layer in auto.layers if layer.name == "model.layers.0.mlp.experts")
        config = model.config
        width = getattr(config, "moe_intermediate_size", config.intermediate_size)
        routed = batch.numel() * config.num_experts_per_tok
        assert experts.mult_adds == 3 * routed * config.hidden_size * width


def test_a_mixture_of_experts_model_built_on_meta_is_summarised() -> None:
    # the huge models one builds on meta are the MoE ones, and no real forward can run there
    config = transformers.MixtralConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, num_local_experts=8,
    )  # fmt: skip
    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(config)
    summary = model_summary(model, input_data=torch.zeros(1, 16, dtype=torch.long, device="meta"))
    assert summary.engine == "meta" and summary.total_params == sum(p.numel() for p in model.parameters())
    experts = next(layer for layer in summary.layers if layer.name == "model.layers.1.mlp.experts")
    assert experts.output_shapes == (16, 4096) and experts.mult_adds == 3 * 16 * 2 * 4096 * 14336


@pytest.mark.parametrize("name", ["bert", "llama", "vit", "mixtral", "qwen2-moe"])
def test_real_architectures_are_batch_independent_and_decoders_causal(name: str) -> None:
    from pytest_modelhooks import batch_leaks, causal_leaks

    model, example = _small(name)
    batch = example.expand(3, *example.shape[1:]).clone()
    batch = batch.random_(0, 500) if not batch.is_floating_point() else torch.randn_like(batch)
    first = "last_hidden_state" if name in ("bert", "vit") else "logits"
    with untouched(model):
        assert batch_leaks(model, batch, output=first) == []
        if name == "vit":
            return
        found = causal_leaks(model, batch, output=first, positions=[0, 5])
    if name == "bert":  # bidirectional: every layer's attention looks ahead, inside its own code
        assert [f.layer for f in found] == [f"encoder.layer.{i}.attention.self" for i in range(2)]
        assert "through BertSelfAttention.forward's own code" in found[0].note
    else:
        assert found == []


def test_t5_with_as_many_samples_as_heads_is_batch_independent() -> None:
    # its relative position bias, (1, heads, T, T), made from (T, T) buckets, has one axis as
    # long as a batch of 4: that is its heads, shared by every sample
    from pytest_modelhooks import batch_leaks

    torch.manual_seed(0)
    config = transformers.T5Config(d_model=64, num_layers=2, num_heads=4, d_ff=128, d_kv=16, vocab_size=500)
    model = transformers.T5ForConditionalGeneration(config).eval()
    ids = torch.randint(0, 500, (4, 12))
    with untouched(model):
        assert batch_leaks(model, ids, output="logits", decoder_input_ids=ids) == []


def test_swin_holds_the_default_bounds_with_its_zero_initialised_position_bias() -> None:
    # the bias table starts at zero, and is looked up with no input: zero by design
    model, example = _small("swin")
    with untouched(model), ActivationStats(model) as stats:
        model(example.repeat(4, 1, 1, 1))
    bias = "swin.encoder.layers.0.blocks.0.attention.relative_position_bias"
    assert float(stats[bias].std[0]) == 0.0
    assert stats.findings(std=(0.001, 50.0), max_dead=0.8) == []


def _first_output(output: object) -> torch.Tensor:
    for field in ("logits", "last_hidden_state"):
        if hasattr(output, field):
            return getattr(output, field)  # type: ignore[no-any-return]
    raise AssertionError(f"no logits or hidden state in {type(output).__name__}")


@pytest.mark.parametrize("name", ["bert", "llama", "vit", "swin", "mixtral", "qwen2-moe"])
def test_the_memory_of_a_training_step_is_what_a_real_step_allocates(name: str) -> None:
    # Swin's windows hand its layer norms' backward a transposed gradient; the experts' grouped
    # matmul has a fake kernel for bfloat16 only, and the CPU runs it in float32
    from pytest_modelhooks import model_memory

    model, batch = _small(name)
    batch = batch.repeat(2, *[1] * (batch.dim() - 1))
    dtype = torch.bfloat16 if name == "mixtral" else None
    with untouched(model):
        fake = model_memory(model, batch, loss=lambda out: _first_output(out).float().sum(), dtype=dtype)
        real = model_memory(
            model, batch, loss=lambda out: _first_output(out).float().sum(), dtype=dtype, engine="real"
        )
    assert fake.to_dict() == real.to_dict()
    assert fake.parameter_bytes == sum(p.numel() for p in model.parameters()) * (2 if dtype else 4)


def test_t5_given_one_tensor_twice_counts_it_once() -> None:
    from pytest_modelhooks import model_memory

    torch.manual_seed(0)
    config = transformers.T5Config(d_model=64, num_layers=2, num_heads=4, d_ff=128, vocab_size=500)
    model = transformers.T5ForConditionalGeneration(config)
    ids = torch.randint(0, 500, (2, 12))
    fake = model_memory(model, ids, loss=lambda out: out.logits.float().sum(), decoder_input_ids=ids)
    real = model_memory(
        model, ids, loss=lambda out: out.logits.float().sum(), decoder_input_ids=ids, engine="real"
    )
    assert fake.to_dict() == real.to_dict()


def test_a_classifiers_model_output_gives_its_logits_to_the_training_checks() -> None:
    from pytest_modelhooks import check_loss_at_init, check_overfits

    torch.manual_seed(0)
    config = transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(config)
    ids, labels = torch.randint(0, 100, (6, 12)), torch.tensor([0, 1, 2, 0, 1, 2])
    with untouched(model):
        loss = check_loss_at_init(model, ({"input_ids": ids}, labels))  # chance: log(3)
        curve = check_overfits(model, ({"input_ids": ids}, labels), steps=200)
    model.train()
    with torch.no_grad():
        torch.manual_seed(0)  # (the check runs in the model's mode, seeded with 0: dropout alike)
        expected = torch.nn.functional.cross_entropy(model(input_ids=ids).logits, labels)
    assert loss == pytest.approx(float(expected), rel=1e-5) and curve.reached


def _no_size(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    shared = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 128}
    if name == "vit":  # declares its image_size in its config (224 by default)
        return transformers.ViTForImageClassification(transformers.ViTConfig(**shared, patch_size=32))
    if name == "wav2vec2":  # raw audio (B, L); its encoder's strides need 400 samples or more
        return transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**shared, conv_dim=(16,) * 7))
    # Whisper's encoder refuses all but 3000 mel frames
    whisper = {"d_model": 64, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 4}
    config = transformers.WhisperConfig(**whisper, decoder_attention_heads=4)
    return transformers.WhisperForAudioClassification(config)


@pytest.mark.parametrize(
    ("name", "shape"), [("vit", (1, 3, 224, 224)), ("wav2vec2", (1, 3000)), ("whisper", (1, 80, 3000))]
)
def test_vision_and_audio_models_are_summarised_with_no_size_given(name: str, shape: tuple[int, ...]) -> None:
    model = _no_size(name).eval()
    with untouched(model):
        summary = model_summary(model)
    assert summary.input_shapes == shape
    with torch.no_grad():
        real = model(torch.randn(shape))
    assert summary.output_shapes == {key: value.shape for key, value in real.items()}


def _encoder_decoder(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "t5":
        return transformers.T5ForConditionalGeneration(
            transformers.T5Config(num_layers=1, d_model=64, d_ff=128, num_heads=2, d_kv=32, vocab_size=500)
        )
    sizes = {"d_model": 64, "encoder_layers": 1, "decoder_layers": 1}
    heads = {"encoder_attention_heads": 2, "decoder_attention_heads": 2}
    if name == "bart":
        widths = {"encoder_ffn_dim": 128, "decoder_ffn_dim": 128}
        return transformers.BartForConditionalGeneration(
            transformers.BartConfig(**sizes, **heads, **widths, vocab_size=500)
        )
    return transformers.WhisperModel(transformers.WhisperConfig(**sizes, **heads))


@pytest.mark.parametrize("name", ["t5", "bart", "whisper"])
def test_encoder_decoders_are_summarised_with_no_input_given(name: str) -> None:
    # they refuse to run without decoder ids: a dummy batch brings 8 of them
    model = _encoder_decoder(name).eval()
    with untouched(model):
        summary = model_summary(model)
    inputs, decoder = summary.input_shapes
    assert decoder == {"decoder_input_ids": (1, 8)}
    real_input = torch.randint(0, 500, inputs) if name != "whisper" else torch.randn(inputs)
    with torch.no_grad():
        real = model(real_input, decoder_input_ids=torch.randint(0, 500, (1, 8)))
    assert summary.output_shapes["last_hidden_state" if name == "whisper" else "logits"] == (
        real.last_hidden_state.shape if name == "whisper" else real.logits.shape
    )


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_encoder_decoders_agree_with_their_bf16_run(name: str) -> None:
    # BART's logits get a float32 bias last, T5's layers float32 norms: bf16's rounding all the same
    from pytest_modelhooks.divergence import first_divergence

    model = _encoder_decoder(name).eval()
    ids = torch.randint(0, 500, (2, 8))
    assert first_divergence(model, ids, against="bf16", decoder_input_ids=ids) == []


@pytest.mark.parametrize("against", ["bf16", "again"])
def test_a_decoder_given_the_cache_of_an_earlier_forward_agrees_with_itself(
    gpt2: torch.nn.Module, against: str
) -> None:
    # a cache filled with gradients on holds tensors autograd made, which deepcopy refuses;
    # a second run given the cache the first one grew would see later positions
    from pytest_modelhooks.divergence import first_divergence

    past = gpt2(torch.randint(0, 100, (1, 6))).past_key_values
    assert past.layers[0].keys.grad_fn is not None
    with untouched(gpt2):
        found = first_divergence(gpt2, torch.randint(0, 100, (1, 2)), past_key_values=past, against=against)
    assert found == []
    assert past.get_seq_length() == 6  # the user's cache as it was


def test_the_parameters_real_models_leave_without_a_gradient_are_named_with_the_reason() -> None:
    # BERT's pooler runs but a loss on the hidden states does not use it; DINOv2's mask token
    # is used only with bool_masked_pos; every other parameter gets its gradient
    from pytest_modelhooks import GradientStats

    bert, tokens = _small("bert")
    config = transformers.Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    dinov2 = transformers.Dinov2Model(config)
    rows = {}
    for model, inputs in (
        (bert, {"input_ids": tokens}),
        (dinov2, {"pixel_values": torch.randn(2, 3, 32, 32)}),
    ):
        with untouched(model.train(), values=False), GradientStats(model) as grads:
            model(**inputs).last_hidden_state.pow(2).mean().backward()
        rows.update({finding.layer: (finding.layer_type, finding.note) for finding in grads.findings()})
    assert list(rows) == ["pooler", "embeddings.mask_token"]
    assert rows["pooler"][0] == "BertPooler, 2 parameters"
    assert rows["pooler"][1].startswith("unused: 'pooler' ran, but none of its output reached the loss")
    assert rows["embeddings.mask_token"][0] == "parameter 1x32"
    assert (
        "the other parameters of 'embeddings' got gradients, this one none"
        in rows["embeddings.mask_token"][1]
    )
