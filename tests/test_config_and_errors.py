"""LongCtxConfig parsing and serialisation, and every error a user can hit."""

import pytest
import torch
from tiny_models import tiny_model
from torch import nn
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

import hf_longctx as lc
from hf_longctx.config import parse_feature


def test_shorthand_dict_and_dataclass_spell_the_same_feature():
    expected = lc.SinkAttention(sink_tokens=8, window=2048)
    assert parse_feature("attention", "sink:2048,8") == expected
    assert parse_feature("attention", "sink:window=2048,sink_tokens=8") == expected
    assert parse_feature("attention", {"type": "sink", "window": 2048, "sink_tokens": 8}) == expected
    assert parse_feature("attention", expected) is expected
    assert parse_feature("attention", "sink") == lc.SinkAttention()


def test_config_dict_round_trip():
    config = lc.LongCtxConfig(attention="sink:1024")
    data = config.to_dict()
    assert data == {"attention": {"type": "sink", "sink_tokens": 4, "window": 1024}}
    assert lc.LongCtxConfig.from_dict(data) == config
    assert lc.LongCtxConfig.coerce(data, attention="sink:512").attention.window == 512


@pytest.mark.parametrize(
    "kwargs,parameter",
    [({"window": 0}, "window"), ({"sink_tokens": -1}, "sink_tokens"), ({"window": 2.5}, "window"), ({"window": True}, "window")],
)
def test_bad_parameters_name_the_parameter_and_range(kwargs, parameter):
    with pytest.raises(ValueError, match=rf"`{parameter}` must be an integer >= \d"):
        lc.SinkAttention(**kwargs)


def test_bad_shorthand_value_names_the_parameter():
    with pytest.raises(ValueError, match="`window`"):
        lc.patch(tiny_model("llama"), attention="sink:abc")


def test_unknown_shorthand_lists_the_known_names():
    with pytest.raises(ValueError, match="unknown attention 'bogus'; known: 's2', 's2_sink', 'sink'"):
        lc.patch(tiny_model("llama"), attention="bogus")
    with pytest.raises(ValueError, match="unknown rope 'bogus'; known: 'abf', "):
        lc.LongCtxConfig(rope="bogus:4")
    with pytest.raises(ValueError, match="unknown speculative 'bogus'; known: 'draft', 'self'"):
        lc.LongCtxConfig(speculative="bogus")


def test_unknown_parameter_and_feature_kind():
    with pytest.raises(ValueError, match="unknown parameter.*sinks.*accepted: sink_tokens, window"):
        parse_feature("attention", {"type": "sink", "sinks": 4})
    with pytest.raises(ValueError, match="unknown feature.*flash.*known: attention, rope, kv, speculative"):
        lc.patch(tiny_model("llama"), flash="yes")
    with pytest.raises(ValueError, match="needs at least one feature"):
        lc.patch(tiny_model("llama"))


def test_wrong_kind_of_dataclass():
    with pytest.raises(ValueError, match="is a 'attention' feature"):
        lc.LongCtxConfig(kv=lc.SinkAttention())


def test_encoder_only_model_is_unsupported():
    bert = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(lc.UnsupportedModelError, match="model_type 'bert'.*no causal self-attention.*llama, mistral"):
        lc.patch(bert, attention="sink")


def test_model_without_rotary_embedding_is_unsupported():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(lc.UnsupportedModelError, match="model_type 'gpt2'"):
        lc.patch(gpt2, attention="sink")


def test_attention_outside_the_registry_is_unsupported():
    from legacy_model import LegacyForCausalLM

    with pytest.raises(lc.UnsupportedModelError, match="model_type 'legacy'.*not routed through transformers' AttentionInterface"):
        lc.patch(LegacyForCausalLM.tiny(), attention="sink")


def test_plain_torch_module_is_unsupported():
    with pytest.raises(lc.UnsupportedModelError, match="not a transformers PreTrainedModel"):
        lc.patch(nn.Linear(2, 2), attention="sink")


def test_attention_dropout_and_4d_masks_are_refused():
    model = lc.patch(tiny_model("llama"), attention="sink:8")
    model.train()
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(ValueError, match="dropout"):
        model(torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="2D"):
        from hf_longctx.attention import sink_attention_forward

        q = torch.randn(1, 4, 3, 16)
        k = torch.randn(1, 2, 3, 16)
        sink_attention_forward(model.model.layers[0].self_attn, q, k, k, torch.ones(1, 1, 3, 3, dtype=torch.bool))
