from __future__ import annotations

import json
import re
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from pytest_modelhooks import LayerError, model_sizes, model_summary
from tests import zoo
from tests.helpers import untouched


def summarise(name: str, **kwargs: Any) -> Any:
    model, batch = zoo.build(name)
    with untouched(model):
        return model, model_summary(model, input_data=batch, **kwargs)


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_totals_equal_the_parameters_of_the_model(name: str) -> None:
    model, summary = summarise(name)
    params = list(model.parameters())
    assert summary.total_params == sum(param.numel() for param in params)
    assert summary.trainable_params == sum(param.numel() for param in params if param.requires_grad)
    assert summary.param_bytes == sum(param.numel() * param.element_size() for param in params)
    assert summary.buffer_bytes == sum(buffer.numel() * buffer.element_size() for buffer in model.buffers())
    assert f"Total params: {summary.total_params:,}" in str(summary)


def test_tied_weights_count_once() -> None:
    _, summary = summarise("tied_lm")
    assert summary.total_params == 100 * 24 + (24 * 24 + 24) + 2 * 24
    assert summary["head"].params == 100 * 24  # the row shows what the head holds


def test_rnn_weights_and_loose_parameters_are_counted() -> None:
    _, gru = summarise("gru")
    layer0 = 3 * 20 * (10 + 20) + 2 * 3 * 20
    layer1 = 3 * 20 * (20 + 20) + 2 * 3 * 20
    assert gru["gru"].params == layer0 + layer1
    _, loose = summarise("with_parameter")
    assert loose[""].own_params == 7 and loose.total_params == 7 + 7 * 7 + 7


def test_partly_frozen_modules() -> None:
    _, summary = summarise("partly_frozen")
    assert summary["0"].params == 72 and summary["0"].trainable_params == 8
    assert summary.non_trainable_params == 64
    assert "Trainable #" in str(summary) and "Non-trainable params: 64" in str(summary)


def test_rows_follow_execution_order_with_every_call() -> None:
    _, summary = summarise("reused")
    assert [(layer.name, layer.call_number) for layer in summary.layers] == [
        ("", 1),
        ("inp", 1),
        ("shared", 1),
        ("act", 1),
        ("shared", 2),
    ]
    assert summary.layers[4].calls == 2 and summary.layers[4].label == "shared [call 2]"
    assert "shared [call 2] (Linear)" in str(summary)


def test_modules_that_never_ran_are_listed() -> None:
    _, summary = summarise("data_dependent")
    assert summary.engine == "real"
    neg = summary["neg"]
    assert not neg.ran and neg.calls == 0 and neg.params == 4 * 5 + 5
    assert re.search(r"neg \(Linear\)\s+-\s+never ran\s+25", str(summary))


def test_nested_inputs_and_outputs_are_rendered() -> None:
    _, summary = summarise("lstm_tagger")
    assert summary["lstm"].output_shapes == ((2, 9, 64), ((2, 2, 32), (2, 2, 32)))
    assert "((2, 9, 64), ((2, 2, 32), (2, 2, 32)))" in str(summary)
    _, two = summarise("two_inputs")
    assert two.input_shapes == ((2, 3, 8, 8), (2, 5))
    _, dict_out = summarise("dict_out")
    assert "{logits: (2, 2), hidden: (2, 6)}" in str(dict_out)


def test_mult_adds_are_exact_for_linear_and_conv() -> None:
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Conv1d(1, 4, 3))
    summary = model_summary(nn.Sequential(model[0]), (3, 10))
    assert summary.mult_adds == 3 * 10 * 20
    conv = model_summary(nn.Sequential(nn.Conv2d(2, 4, 3)), (1, 2, 6, 6))
    assert conv.mult_adds == 4 * 4 * 4 * (2 * 3 * 3)
    assert conv["0"].mult_adds == conv.mult_adds


def test_text_is_byte_identical_across_runs_and_engines() -> None:
    model, batch = zoo.build("resnetish")
    texts = {
        engine: str(model_summary(model, input_data=batch, engine=engine))
        for engine in ("meta", "fake", "real")
    }
    assert texts["meta"] == texts["fake"] == texts["real"]
    again, _ = zoo.build("resnetish")
    assert str(model_summary(again, input_data=batch)) == texts["meta"]
    with torch.device("meta"):
        on_meta = zoo.ResNetish()
    assert str(model_summary(on_meta, input_data=batch.to("meta"))) == texts["meta"]
    assert not re.search(r"0x[0-9a-f]{6,}|cpu|meta|cuda|\bsec|\bms\b", texts["meta"])


def test_text_never_truncates_a_cell() -> None:
    long_name = "a_really_long_module_name_that_goes_on_and_on_" * 3
    model = nn.Sequential()
    model.add_module(long_name, nn.Linear(3, 300))
    summary = model_summary(model, input_size=(123456, 3))
    text = str(summary)
    assert f"{long_name} (Linear)" in text and "(123456, 300)" in text and "..." not in text


def test_depth_folds_rows_but_not_totals() -> None:
    _, full = summarise("resnetish")
    _, folded = summarise("resnetish", depth=1)
    assert {layer.depth for layer in folded.visible_layers} == {0, 1}
    assert folded.total_params == full.total_params
    assert folded["layer1"].params == full["layer1"].params
    assert "layer1.0.conv1" not in str(folded) and "layer1.0.conv1" in str(full)
    assert "folded" in str(folded)


def test_to_dict_is_json_ready() -> None:
    _, summary = summarise("dataclass_out")
    data = json.loads(json.dumps(summary.to_dict()))
    assert data["total_params"] == summary.total_params
    assert data["layers"][0]["output_shapes"] == {"logits": [2, 2], "hidden": [[2, 6]]}
    assert data["param_memory"] == {
        "float32": {"elements": summary.total_params, "bytes": 4 * summary.total_params}
    }


def test_default_input_is_a_dummy_batch() -> None:
    summary = model_summary(zoo.ResNetish())
    assert summary.input_shapes == (1, 3, 64, 64) and summary.output_shapes == (1, 10)


def test_input_size_makes_token_ids_for_an_embedding_model() -> None:
    summary = model_summary(zoo.TiedLM(), input_size=(2, 11))
    assert summary.output_shapes == (2, 11, 100)


def test_failures_name_the_layer_and_leave_the_model_untouched() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(9, 2)).train()
    with (
        untouched(model),
        pytest.raises(LayerError, match=r"layer '1' \(Linear, in_features=9\) got input \(1, 8\)"),
    ):
        model_summary(model, (1, 4))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"input_size": (1, "3")}, ValueError, r"input_size must be a shape such as \(1, 3, 224, 224\)"),
        (
            {"input_size": (1, -3)},
            ValueError,
            r"input_size must hold positive dimensions, got input_size=\(1, -3\)",
        ),
        (
            {"input_size": (1, 4), "input_data": torch.zeros(1, 4)},
            ValueError,
            r"either input_size= or input_data=",
        ),
        (
            {"input_size": torch.zeros(1, 4), "input_data": torch.zeros(1, 4)},
            ValueError,
            r"got input data both as input_size and as input_data=; pass it once",
        ),
        ({"depth": -1}, ValueError, r"depth must be a non-negative int or None, got depth=-1"),
        ({"input_data": 3}, TypeError, r"input_data must be a tensor, a tuple of positional inputs"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        model_summary(zoo.mlp(), **kwargs)


def test_tensors_given_as_the_input_size_are_the_input_data() -> None:
    model = zoo.mlp()
    batch = torch.randn(3, 20)
    expected = str(model_summary(model, input_data=batch))
    assert "Input: (3, 20)" in expected
    assert str(model_summary(model, batch)) == expected
    assert str(model_summary(model, (batch,))) == expected
    two, pair = zoo.TwoInputs(), (torch.randn(2, 3, 6, 6), torch.randn(2, 5))
    assert str(model_summary(two, pair)) == str(model_summary(two, input_data=pair))
    named = {"image": pair[0], "extra": pair[1]}
    assert str(model_summary(two, named)) == str(model_summary(two, input_data=named))


def test_a_7b_decoder_built_on_meta_summarises_quickly() -> None:
    with torch.device("meta"):
        model = zoo.Decoder(vocab=32000, dim=4096, layers=32, hidden=11008, heads=32)
    summary = model_summary(model, input_size=(1, 16))
    assert summary.total_params == sum(param.numel() for param in model.parameters())
    assert 6.7e9 < summary.total_params < 6.8e9
    assert summary.output_shapes == (1, 16, 32000) and summary.engine == "meta"
    assert summary.mult_adds is not None and summary.mult_adds > 16 * 6.4e9


def test_a_module_reused_in_two_places_counts_in_both_parents() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Sequential(shared, nn.ReLU()), nn.Sequential(shared, nn.Tanh()))
    summary = model_summary(model, (2, 4))
    assert summary["0"].params == summary["1"].params == 20
    assert summary.total_params == 20
    assert [(layer.name, layer.call_number) for layer in summary.layers if layer.type == "Linear"] == [
        ("0.0", 1),
        ("0.0", 2),
    ]


@pytest.mark.parametrize("name", ["resnetish", "unet", "tied_lm", "with_parameter", "partly_frozen"])
def test_every_row_counts_its_module_recursively(name: str) -> None:
    model, summary = summarise(name)
    modules = dict(model.named_modules())
    for layer in summary.layers:
        params = list(modules[layer.name].parameters())
        assert layer.params == sum(p.numel() for p in params), layer.name
        assert layer.trainable_params == sum(p.numel() for p in params if p.requires_grad), layer.name
        assert layer.own_params == sum(p.numel() for p in modules[layer.name].parameters(recurse=False))


def test_meta_shortcuts_give_the_real_engines_numbers() -> None:
    # Linear/activations/Identity/Dropout run as stand-ins on the meta engine; every row must
    # match a real forward's, multiply-adds included (3-d inputs, in-place, no bias)
    model = nn.Sequential(
        nn.Linear(6, 12),
        nn.ReLU(inplace=True),
        nn.Dropout(0.1),
        nn.Linear(12, 12, bias=False),
        nn.GELU(approximate="tanh"),
        nn.Identity(),
        nn.Linear(12, 3),
        nn.Sigmoid(),
    )
    with untouched(model):
        meta = model_summary(model, input_data=torch.randn(2, 5, 6))
        real = model_summary(model, input_data=torch.randn(2, 5, 6), engine="real")
    assert meta.engine == "meta" and real.engine == "real"
    assert meta.layers == real.layers
    assert meta.mult_adds == real.mult_adds == 2 * 5 * (6 * 12 + 12 * 12 + 12 * 3)


_ACTIVATIONS: list[Any] = [
    lambda: nn.ReLU(),
    lambda: nn.ReLU(inplace=True),
    lambda: nn.GELU(),
    lambda: nn.GELU(approximate="tanh"),
    lambda: nn.SiLU(inplace=True),
    lambda: nn.Tanh(),
    lambda: nn.Sigmoid(),
    lambda: nn.Identity(),
    lambda: nn.Dropout(0.2),
]


@st.composite
def linear_stacks(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor]:
    """Random (nested) stacks of Linear layers, activations and LayerNorms (no stand-in: the
    meta kernel runs), and an input of rank 2 or 3."""
    width = first = draw(st.integers(1, 12))

    def block(depth: int) -> nn.Sequential:
        nonlocal width
        layers: list[nn.Module] = []
        for _ in range(draw(st.integers(1, 4))):
            kind = draw(st.sampled_from(["activation", "linear", "linear", "norm", "block"]))
            if kind == "activation":
                layers.append(draw(st.sampled_from(_ACTIVATIONS))())
            elif kind == "norm":
                layers.append(nn.LayerNorm(width))
            elif kind == "block" and depth < 2:
                layers.append(block(depth + 1))
            else:
                out = draw(st.integers(1, 12))
                layers.append(nn.Linear(width, out, bias=draw(st.booleans())))
                width = out
        return nn.Sequential(*layers)

    model = block(0)
    shape = (draw(st.integers(1, 3)),) + ((draw(st.integers(1, 4)),) if draw(st.booleans()) else ())
    return model, torch.randn(*shape, first)


@settings(max_examples=60, deadline=None)
@given(linear_stacks())
def test_meta_engine_agrees_with_a_real_forward(case: tuple[nn.Module, torch.Tensor]) -> None:
    model, batch = case
    with untouched(model):
        meta = model_summary(model, input_data=batch)
        real = model_summary(model, input_data=batch, engine="real")
    assert meta.engine == "meta"
    assert meta.layers == real.layers
    assert meta.mult_adds == real.mult_adds


class ReturnsItsInput(nn.Module):
    """Records whether its Sequential handed back the very tensor it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Identity(), nn.ReLU(inplace=True), nn.Dropout())
        self.same: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        self.same.append(out is x)
        return out


def test_a_sequential_of_pass_through_layers_returns_its_input_on_every_engine() -> None:
    model = ReturnsItsInput()
    for engine in ["meta", "real"]:
        model_summary(model, input_data=torch.randn(2, 3), engine=engine)
    assert model.same == [True, True]


def test_parametrized_and_reused_linears_in_a_sequential() -> None:
    from torch.nn.utils import parametrize

    class Symmetric(nn.Module):
        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return weight.triu() + weight.triu(1).transpose(0, 1)

    shared = nn.Linear(6, 6)
    tied = nn.Linear(6, 6)
    parametrize.register_parametrization(tied, "weight", Symmetric())
    model = nn.Sequential(nn.Linear(4, 6), shared, nn.Tanh(), tied, shared)
    with untouched(model):
        meta = model_summary(model, input_data=torch.randn(3, 4))
        real = model_summary(model, input_data=torch.randn(3, 4), engine="real")
    assert meta.engine == "meta" and meta.layers == real.layers
    assert meta.mult_adds == real.mult_adds == 3 * (4 * 6 + 3 * 6 * 6)
    assert meta["1 [call 2]"].output_shapes == (3, 6)


def test_memory_lines_count_elements_in_good_english() -> None:
    text = str(model_summary(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)), input_size=(4, 2)))
    # BatchNorm's step counter is one int64: "1 element", not "1 elements"
    assert "Buffer memory: float32 24 B (6 elements); int64 8 B (1 element)" in text
    assert "Parameter memory: float32 60 B (15 elements)" in text


class EagerAttention(nn.Module):
    """Attention written out the way LLM code does it: fused qkv, RMSNorm, rotary halves, a
    causal mask, masked_fill/where, softmax, an empty KV cache to append to. On the meta engine
    each of these ops is answered directly (see pytest_modelhooks.tracing.dispatch)."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm_weight = nn.Parameter(torch.ones(dim))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_weight
        q, k, v = self.qkv(h).split(dim, dim=-1)
        q, k, v = (t.view(batch, tokens, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        half = q.shape[-1] // 2
        angle = torch.arange(tokens, device=x.device, dtype=x.dtype)[:, None] * 0.1
        cos, sin = angle.cos(), angle.sin()
        q = q * cos + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin
        past = torch.empty(0, device=x.device, dtype=x.dtype)  # an empty cache
        k = torch.cat([past, k], dim=-2)
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        causal = torch.tril(torch.ones(tokens, tokens, dtype=torch.bool, device=x.device))
        scores = scores.masked_fill(~causal, float("-inf"))
        scores = torch.where(causal, scores, torch.zeros((), device=x.device))
        attention = scores.softmax(dim=-1) @ v
        return x + self.out(attention.transpose(1, 2).reshape(batch, tokens, dim))


def test_llm_style_attention_reads_the_same_on_meta_and_for_real() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(EagerAttention(), EagerAttention())
    batch = torch.randn(2, 7, 32)
    with untouched(model):
        meta = model_summary(model, input_data=batch, engine="meta")
        real = model_summary(model, input_data=batch, engine="real")
    assert meta.layers == real.layers and meta.mult_adds == real.mult_adds
    assert str(meta) == str(real)


def test_idle_modules_sit_under_their_parent_in_the_tree() -> None:
    # nn.MultiheadAttention uses out_proj's weights directly: the row belongs under the attention,
    # not after the last layer; a module whose children ran without it comes before them
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.wrapper = nn.Sequential(nn.Linear(8, 8))  # never called itself
            self.head = nn.Linear(8, 2)
            self.spare = nn.Linear(2, 2)  # never called at all

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.attn(x, x, x, need_weights=False)[0]
            return self.head(self.wrapper[0](x))

    summary = model_summary(Outer(), (2, 5, 8))
    assert [(layer.name, layer.ran) for layer in summary.layers] == [
        ("", True),
        ("attn", True),
        ("attn.out_proj", False),
        ("wrapper", False),
        ("wrapper.0", True),
        ("head", True),
        ("spare", False),
    ]
    lines = str(summary).splitlines()
    attention = next(index for index, line in enumerate(lines) if line.startswith("  attn "))
    assert re.search(
        r"^    attn\.out_proj \(NonDynamicallyQuantizableLinear\)\s+-\s+never ran", lines[attention + 1]
    )


@pytest.mark.parametrize("masked", [False, True])
def test_torch_transformer_encoder_reads_the_same_on_every_engine(masked: bool) -> None:
    # In eval mode under no_grad torch runs each layer as one fused kernel (with a padding mask,
    # on nested tensors): the summary would lose every submodule and its mult-adds on a real
    # forward. The trace turns that path off, so the engines agree, and turns it back on.
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    batch: dict[str, torch.Tensor] = {"src": torch.randn(3, 6, 16)}
    if masked:
        mask = torch.zeros(3, 6, dtype=torch.bool)
        mask[0, 4:] = True
        batch["src_key_padding_mask"] = mask
    with untouched(model):
        texts = {
            engine: str(model_summary(model, input_data=batch, engine=engine))
            for engine in ("meta", "fake", "real")
        }
    assert texts["meta"] == texts["fake"] == texts["real"]
    summary = model_summary(model, input_data=batch, engine="real")
    assert [layer.name for layer in summary.layers if not layer.ran and not layer.container] == [
        "layers.0.self_attn.out_proj",
        "layers.1.self_attn.out_proj",
    ]
    assert [layer.name for layer in summary.layers if layer.container] == ["layers"]  # the ModuleList
    assert summary["layers.0.linear1"].output_shapes == (3, 6, 32)
    assert summary.mult_adds == 2 * summary["layers.0"].mult_adds > 0
    assert torch.backends.mha.get_fastpath_enabled()


def test_the_attention_fast_path_flag_is_restored_when_the_forward_fails() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert not torch.backends.mha.get_fastpath_enabled()
            raise RuntimeError("boom")

    with pytest.raises(LayerError, match="boom"):
        model_summary(Broken(), (1, 3, 8))
    assert torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:  # a user's own choice is kept, not switched on
        model_summary(nn.Sequential(nn.Linear(2, 2)), (1, 2))
        assert not torch.backends.mha.get_fastpath_enabled()
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


class _Masked(nn.Module):
    """A forward with a keyword input beside the data: its mask shapes the output."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 6)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, *, scale: float = 1.0
    ) -> torch.Tensor:
        out = self.proj(x) * scale
        return out if mask is None else out[mask]


def test_other_keyword_arguments_go_to_the_forward_as_in_torchinfo() -> None:
    model, batch = _Masked(), torch.randn(2, 3, 4)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    with untouched(model):
        by_keyword = model_summary(model, batch, mask=mask, scale=2.0)
    expected = model_summary(model, input_data={"x": batch, "mask": mask, "scale": 2.0})
    rows = [(row.name, row.output_shapes, row.mult_adds) for row in by_keyword.layers]
    assert rows == [(row.name, row.output_shapes, row.mult_adds) for row in expected.layers]
    assert "Input: ((2, 3, 4), {mask: (2, 3), scale: -})" in str(by_keyword)
    assert by_keyword.output_shapes == (3, 6)  # the mask reached the forward
    # beside a shape, a tuple of inputs, a dummy batch, and as the whole input
    assert model_summary(model, (2, 3, 4), mask=mask).output_shapes == (3, 6)
    assert model_summary(model, input_data=(batch,), mask=mask).output_shapes == (3, 6)
    assert model_summary(model, mask=torch.tensor([True])).output_shapes == (1, 6)
    assert model_summary(model, x=batch, mask=mask).output_shapes == (3, 6)
    assert model_sizes(model, batch, mask=mask)[0] == (2, 3, 6)
    assert model_sizes(model, input=batch, mask=mask, modules="all")[""] == (3, 6)
    assert model_sizes(model, x=batch, modules="all")[""] == (2, 3, 6)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda model: model_summary(model, (1, 3, 4), dept=2),
            TypeError,
            r"model_summary\(\) got an unexpected keyword argument 'dept': it is neither one of "
            r"model_summary\(\)'s options nor a parameter of _Masked\.forward\(x, mask, \*, scale\)$",
        ),
        (
            lambda model: model_sizes(model, (3, 4), modules_="all"),
            TypeError,
            r"model_sizes\(\) got an unexpected keyword argument 'modules_'",
        ),
        (
            lambda model: model_summary(model, input_data={"x": torch.zeros(1, 4), "mask": None}, mask=None),
            ValueError,
            r"model_summary\(\): 'mask' given in the input and as a keyword",
        ),
        (
            lambda model: model_sizes(model, (3, 4), x=torch.zeros(1, 4)),
            ValueError,
            r"size=\(3, 4\) was given, but the keyword inputs fill _Masked\.forward's first input",
        ),
    ],
    ids=["misspelt option", "misspelt sizes option", "given twice", "size and first input"],
)
def test_keyword_arguments_the_forward_does_not_take_are_refused_first(
    call: Any, error: type[Exception], match: str
) -> None:
    model = _Masked()
    with untouched(model), pytest.raises(error, match=match):
        call(model)


def test_a_forward_failing_on_a_keyword_input_names_it_and_leaves_the_model() -> None:
    # the mask reaches the forward and breaks it after proj ran: the error shows the keyword
    # inputs' shapes, and the model is as it was (no hooks, flags, values)
    model = _Masked().train()
    with (
        untouched(model),
        pytest.raises(
            LayerError,
            match=r"model _Masked got input \(\(2, 3, 4\), \{mask: \(5, 5\)\}\).*after layer 'proj'",
        ),
    ):
        model_summary(model, torch.randn(2, 3, 4), mask=torch.ones(5, 5, dtype=torch.bool))
    batch_model = _ReadsABatchDict()
    with untouched(batch_model), pytest.raises(LayerError, match=r"KeyError: 'offset'"):
        model_sizes(batch_model, {"image": torch.randn(3, 4)})  # one input, a field missing


def test_a_forward_taking_any_keyword_gets_them_all() -> None:
    class Open(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
            return self.proj(x) + sum(extra.values(), torch.zeros(()))

    summary = model_summary(Open(), (2, 4), bias=torch.ones(5, 1, 4))
    assert summary.output_shapes == (5, 2, 4)


class _ReadsABatchDict(nn.Module):
    """``forward(self, batch)`` reading named fields, as training pipelines write it."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.head = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.enc(batch["image"]) + batch["offset"])


def test_a_dict_whose_keys_are_no_parameters_is_the_one_input() -> None:
    # a dict is keyword inputs when its keys name the forward's parameters; for forward(batch)
    # it failed with "unexpected keyword argument 'image'"
    model, batch = _ReadsABatchDict(), {"image": torch.randn(3, 4), "offset": torch.zeros(3, 8)}
    expected = model_summary(model, input_data=(batch,))
    assert str(model_summary(model, batch)) == str(model_summary(model, input_data=batch)) == str(expected)
    assert expected.output_shapes == (3, 2)
    assert model_sizes(model, batch) == model_sizes(model, input=(batch,))
    # keys that do name its parameters stay keyword inputs, also for a forward taking **kwargs
    assert model_summary(model, input_data={"batch": batch}).output_shapes == (3, 2)

    class Open(nn.Module):
        def forward(self, **fields: torch.Tensor) -> torch.Tensor:
            return fields["image"] * 2

    assert model_summary(Open(), input_data={"image": torch.ones(2, 3)}).output_shapes == (2, 3)

    class Starred(nn.Module):
        def forward(self, *inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            return inputs[0]["image"] + 1

    assert model_summary(Starred(), input_data={"image": torch.ones(2, 3)}).output_shapes == (2, 3)


def test_a_dict_naming_some_parameters_but_not_others_is_refused_first() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            return self.proj(x)

    model = TwoInputs()
    with (
        untouched(model),
        pytest.raises(
            TypeError,
            match=r"input_data: a dict is the forward's keyword inputs, and 'msk' is not a parameter of "
            r"TwoInputs\.forward\(x, mask\); to pass the dict itself as the first input, wrap it in a "
            r"tuple: input_data=\(batch,\)",
        ),
    ):
        model_summary(model, input_data={"x": torch.ones(2, 4), "msk": torch.ones(2)})
    with pytest.raises(TypeError, match=r"^input: a dict is the forward's keyword inputs, and 'msk'"):
        model_sizes(model, input={"x": torch.ones(2, 4), "msk": torch.ones(2)})


def test_the_markdown_table_keeps_one_cell_per_column() -> None:
    model = nn.ModuleDict({"a|b": nn.Linear(2, 3), "idle": nn.Linear(3, 3)})

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.parts = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.parts["a|b"](x)

    table = model_summary(Wrapper(), (1, 2)).to_markdown().splitlines()
    rows = [line for line in table if line.startswith("| `")]
    assert [len(row.replace("\\|", "").split("|")) for row in rows] == [8] * len(rows)  # 6 cells
    assert "| `parts.a\\|b` | Linear | (1, 2) | (1, 3) | 9 | 6 |" in rows
    assert "| `parts.idle` | Linear | - | never ran | 12 |  |" in rows
    folded = model_summary(Wrapper(), (1, 2), depth=0).to_markdown()  # depth folds rows here too
    assert [line for line in folded.splitlines() if line.startswith("| `")] == [
        "| `Wrapper` | Wrapper | (1, 2) | (1, 3) | 21 | 6 |"
    ]


def test_a_model_failing_on_keyword_inputs_shows_them() -> None:
    class NeedsMask(nn.Module):
        def forward(self, src: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return src @ mask

    with pytest.raises(LayerError, match=r"model NeedsMask got input \{src: \(2, 3\), mask: \(4, 4\)\}"):
        model_summary(NeedsMask(), input_data={"src": torch.ones(2, 3), "mask": torch.ones(4, 4)})


@pytest.mark.parametrize(
    ("model", "size", "expected"),
    [
        # 4 gates x hidden x (input + hidden) multiply-adds per token and layer
        (nn.LSTM(8, 16, batch_first=True), (2, 5, 8), 10 * 4 * 16 * (8 + 16)),
        (nn.LSTM(8, 16, num_layers=2, bidirectional=True), (5, 2, 8), 10 * 2 * 4 * 16 * (8 + 16 + 32 + 16)),
        (nn.GRU(8, 16), (5, 2, 8), 10 * 3 * 16 * (8 + 16)),
        (nn.Bilinear(3, 5, 2), [(4, 3), (4, 5)], 4 * 2 * 3 * 5),
    ],
    ids=["lstm", "deep-bidirectional-lstm", "gru", "bilinear"],
)
def test_recurrent_and_bilinear_mult_adds_agree_on_every_engine(
    model: nn.Module, size: Any, expected: int
) -> None:
    # the CPU runs an LSTM as one oneDNN kernel, which torch's flop formulas do not cover
    counts = {
        engine: model_summary(model, input_size=size, engine=engine).mult_adds for engine in ("meta", "real")
    }
    assert counts == {"meta": expected, "real": expected}


def test_packed_lstm_input_summarises_on_meta_with_the_real_counts() -> None:
    lstm = nn.LSTM(8, 16, batch_first=True)
    packed = pack_padded_sequence(torch.randn(3, 5, 8), torch.tensor([5, 3, 2]), batch_first=True)
    with untouched(lstm):
        auto = model_summary(lstm, input_data=(packed,))
        real = model_summary(lstm, input_data=(packed,), engine="real")
    assert auto.engine == "meta" and str(auto) == str(real)
    assert auto.mult_adds == 10 * 4 * 16 * (8 + 16)  # 10 tokens, padding not counted
    # the packed data and the longest sequence, not a tuple of four shapes
    row = " ".join(str(auto).splitlines()[5].split())
    assert (
        row == "LSTM packed(10, 8; 5 steps) (packed(10, 16; 5 steps), ((1, 3, 16), (1, 3, 16))) 1,664 15,360"
    )
    assert auto.input_shapes == ((10, 8), (5,), None, None)


def test_no_global_hook_state_outlives_a_summary() -> None:
    # torch keeps a global hook's with_kwargs flag after the hook is removed; a leftover made
    # every later torch.compile'd module in the process warn about global hooks
    from torch.nn.modules import module as torch_module

    model_summary(nn.Sequential(nn.Linear(2, 2)), (1, 2))
    with pytest.raises(LayerError):
        model_summary(nn.Sequential(nn.Linear(3, 2)), (1, 2))
    assert not torch_module._has_any_global_hook()


def test_a_torch_without_keyword_global_hooks_still_summarises(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch < 2.2 has no with_kwargs for global forward hooks: keyword inputs go unseen there
    from torch.nn.modules import module as torch_module

    original = torch_module.register_module_forward_hook

    def without_kwargs(hook: Any, *, always_call: bool = False) -> Any:
        return original(hook, always_call=always_call)

    expected = str(model_summary(zoo.ResNetish(), (1, 3, 32, 32)))
    monkeypatch.setattr(torch_module, "register_module_forward_hook", without_kwargs)
    assert str(model_summary(zoo.ResNetish(), (1, 3, 32, 32))) == expected


def test_mult_adds_of_a_linear_on_a_nested_batch_count_its_tokens() -> None:
    # F.linear on a nested tensor reaches dispatch whole (no decomposed matmul to count)
    parts = [torch.randn(2, 4), torch.randn(5, 4)]
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    nested = model_summary(model, input_data=(torch.nested.nested_tensor(parts, layout=torch.jagged),))
    dense = model_summary(model, input_data=(torch.cat(parts),))
    assert nested.mult_adds == dense.mult_adds == 7 * 4 * 6
    assert nested.engine == "real" and nested["0"].output_shapes == (2, None, 6)


def test_module_lists_and_dicts_get_a_container_row_above_what_they_hold() -> None:
    # without it, blocks.0 reads as a child of the row above (pos)
    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Embedding(8, 16)
            self.blocks = nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16)])
            self.heads = nn.ModuleDict({"lm": nn.Linear(16, 4)})

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.pos(x)
            for block in self.blocks:
                h = block(h)
            return self.heads["lm"](h)

    summary = model_summary(LM(), input_data=torch.zeros(1, 8, dtype=torch.long))
    rows = [(layer.name, layer.depth, layer.container) for layer in summary.layers]
    assert rows == [
        ("", 0, False),
        ("pos", 1, False),
        ("blocks", 1, True),
        ("blocks.0", 2, False),
        ("blocks.1", 2, False),
        ("heads", 1, True),
        ("heads.lm", 2, False),
    ]
    assert summary["blocks"].params == 2 * (16 * 16 + 16) and not summary["blocks"].ran
    line = next(line for line in str(summary).splitlines() if line.startswith("  blocks (ModuleList)"))
    assert line.split()[2:4] == ["-", "container"]
    assert summary.to_dict()["layers"][2]["container"] is True
    assert "| `blocks` | ModuleList | - | container |" in summary.to_markdown()


def test_a_spatial_input_size_that_fails_the_first_convolution_says_what_to_pass() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.raises(
        LayerError, match=r"pass input_size=\(1, 3, 32, 32\) \(model_sizes takes the spatial"
    ) as caught:
        model_summary(net, (32, 32))
    assert caught.value.layer == "0" and isinstance(caught.value.original, RuntimeError)
    with pytest.raises(LayerError, match=r"the full input shape.*input_size=\(1, 3, 10\)"):
        model_summary(nn.Conv1d(3, 4, 3), (10,))  # the model is its first layer


def test_a_model_reshaping_a_flat_input_for_its_convolution_takes_that_input_size() -> None:
    class FlatImages(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x.view(-1, 1, 28, 28))

    summary = model_summary(FlatImages(), (64, 784))  # two dims, as many as the conv's spatial ones
    assert summary["conv"].output_shapes == torch.Size([64, 4, 26, 26])
