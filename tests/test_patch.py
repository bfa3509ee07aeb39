"""patch / unpatch / from_pretrained on tiny random models of every supported family."""

import pytest
import torch
from tiny_models import FAMILIES, STOCK_ATTENTION, random_ids, tiny_model
from transformers import AutoModelForCausalLM

import hf_longctx as lc
from hf_longctx.kernels.reference import logical_positions

FAMILY_NAMES = list(FAMILIES)


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def sink_window_mask(length, sink, window):
    """(1, 1, S, S) bool mask of the sink/window rule, for a stock model's explicit 4D mask."""
    pos = logical_positions(1, length, torch.device("cpu"))[0]
    causal = pos[None, :] <= pos[:, None]
    keep = (pos[None, :] < sink) | (pos[:, None] - pos[None, :] < window)
    return (causal & keep)[None, None]


def additive(mask):
    return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_window_covering_the_sequence_equals_stock(family):
    stock = tiny_model(family)
    ids = random_ids(2, 40)
    expected = logits(stock, ids)
    expected_tokens = stock.generate(ids[:1], max_new_tokens=12, do_sample=False)

    lc.patch(stock, attention="sink:4096")
    assert stock.config._attn_implementation == "longctx_sink"
    torch.testing.assert_close(logits(stock, ids), expected, atol=1e-5, rtol=1e-5)
    tokens = stock.generate(ids[:1], max_new_tokens=12, do_sample=False)
    assert torch.equal(tokens, expected_tokens)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_small_window_equals_stock_with_the_explicit_mask(family):
    sink, window, length = 2, 6, 40
    stock = tiny_model(family)
    ids = random_ids(1, length)
    mask = sink_window_mask(length, sink, window)
    if family == "gemma2":
        # The local layers keep their own window; only the global layers take the sink/window mask.
        native = sink_window_mask(length, 0, stock.config.sliding_window)
        explicit = {"full_attention": mask, "sliding_attention": native}
    else:
        explicit = mask
    if STOCK_ATTENTION[family] == "eager":  # eager adds the mask to the scores: make it additive
        explicit = {key: additive(m) for key, m in explicit.items()}
    expected = logits(stock, ids, attention_mask=explicit)

    patched = lc.patch(tiny_model(family), attention=lc.SinkAttention(sink_tokens=sink, window=window))
    got = logits(patched, ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - logits(tiny_model(family), ids)).abs().max() > 1e-3  # the window really bites


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_left_padded_batch_rows_equal_their_unbatched_runs(family):
    model = lc.patch(tiny_model(family), attention="sink:6,2")
    short, long = random_ids(1, 11, seed=3), random_ids(1, 19, seed=4)
    pad = model.config.pad_token_id
    batch = torch.full((2, 19), pad)
    batch[0, 8:] = short[0]
    batch[1] = long[0]
    mask = (batch != pad).long()
    mask[1] = 1
    out = model.generate(batch, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=pad)
    for row, single in enumerate((short, long)):
        alone = model.generate(single, max_new_tokens=10, do_sample=False, pad_token_id=pad)
        assert torch.equal(out[row, 19:], alone[0, single.shape[1]:]), f"row {row}"


def test_packed_sequences_equal_separate_runs():
    model = lc.patch(tiny_model("llama"), attention="sink:5,2")
    first, second = random_ids(1, 17, seed=5), random_ids(1, 23, seed=6)
    packed = torch.cat([first, second], dim=1)
    position_ids = torch.cat([torch.arange(17), torch.arange(23)])[None]
    got = logits(model, packed, position_ids=position_ids)
    torch.testing.assert_close(got[:, :17], logits(model, first), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:, 17:], logits(model, second), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_unpatch_restores_the_model_exactly(family):
    model = tiny_model(family)
    ids = random_ids(1, 30)
    config_before = model.config.to_dict()
    attrs_before = set(model.__dict__)
    expected = logits(model, ids)

    lc.patch(model, attention="sink:4,1")
    assert (logits(model, ids) - expected).abs().max() > 1e-3
    lc.unpatch(model)

    assert model.config.to_dict() == config_before
    assert not hasattr(model.config, "longctx")
    assert set(model.__dict__) == attrs_before
    assert model.config._attn_implementation == STOCK_ATTENTION[family]
    assert lc.patched_config(model) is None
    torch.testing.assert_close(logits(model, ids), expected, atol=0, rtol=0)


def test_patching_twice_is_a_noop_and_another_config_replaces():
    model = tiny_model("llama")
    lc.patch(model, attention="sink:8")
    first_state = model._longctx_patch_state
    lc.patch(model, lc.LongCtxConfig(attention={"type": "sink", "window": 8, "sink_tokens": 4}))
    assert model._longctx_patch_state is first_state

    lc.patch(model, attention="sink:16,1")
    assert model.config.longctx == {"attention": {"type": "sink", "sink_tokens": 1, "window": 16}}
    assert lc.patched_config(model).attention == lc.SinkAttention(sink_tokens=1, window=16)
    lc.unpatch(model)
    assert model.config._attn_implementation == "sdpa" and not hasattr(model.config, "longctx")


def test_save_and_from_pretrained_reapply_the_patch(tmp_path):
    model = lc.patch(tiny_model("qwen3"), attention="sink:6,2")
    ids = random_ids(1, 25)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)

    loaded = lc.from_pretrained(tmp_path)
    assert lc.patched_config(loaded) == lc.LongCtxConfig(attention="sink:6,2")
    assert loaded.config._attn_implementation == "longctx_sink"
    torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-5, rtol=1e-5)
    lc.unpatch(loaded)
    assert not hasattr(loaded.config, "longctx")


def test_attn_implementation_at_load_time(tmp_path):
    stock = tiny_model("mistral")
    stock.save_pretrained(tmp_path)
    ids = random_ids(1, 30)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="longctx_sink").eval()
    assert loaded.config._attn_implementation == "longctx_sink"
    # Default SinkAttention (window 4096) covers the sequence: exact.
    torch.testing.assert_close(logits(loaded, ids), logits(stock, ids), atol=1e-5, rtol=1e-5)


def test_autocast_mixed_dtypes_run_in_the_autocast_dtype():
    """Under bf16 autocast with float32 weights, RoPE gives float32 q/k and v is bf16: computed in bf16, like SDPA."""
    from hf_longctx.attention.sink import sink_attention_forward

    model = tiny_model("llama")
    lc.patch(model, attention="sink:8,2")
    module = model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, shape, 12, 16, generator=gen) for shape in (4, 2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, _ = sink_attention_forward(module, q.bfloat16(), k.bfloat16(), v.bfloat16(), None)
        got, _ = sink_attention_forward(module, q, k, v.bfloat16(), None)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected)
