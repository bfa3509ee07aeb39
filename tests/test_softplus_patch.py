"""``lc.patch(model, attention="softplus")``: tiny models, generate, training gradients, unpatch, errors."""

from __future__ import annotations

import pytest
import torch

import hf_longctx as lc
from hf_longctx.attention.softplus import SOFTPLUS_ATTENTION_NAME
from hf_longctx.kernels.reference_softplus import softplus_attention
from tests.tiny_models import STOCK_ATTENTION, random_ids, tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_generate_unpatch(family):
    model = tiny_model(family)
    ids = random_ids(1, 12)
    expected = model(ids).logits
    lc.patch(model, attention="softplus")
    assert model.config._attn_implementation == SOFTPLUS_ATTENTION_NAME
    assert model.config.longctx == {"attention": {"type": "softplus", "reweight": True, "power": 15}}
    patched = model(ids).logits
    assert torch.isfinite(patched).all() and (patched - expected).abs().max() > 1e-3
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    # cached decode equals a full forward over the generated text (absolute N_i at every step)
    full = model(out[:, :-1]).logits[:, ids.shape[1] - 1:].argmax(-1)
    assert torch.equal(full, out[:, ids.shape[1]:])
    lc.unpatch(model)
    assert model.config._attn_implementation == STOCK_ATTENTION[family]
    torch.testing.assert_close(model(ids).logits, expected, atol=0, rtol=0)


def test_registry_function_ignores_scaling_and_uses_the_reference():
    from hf_longctx.attention.softplus import softplus_attention_forward

    model = lc.patch(tiny_model("llama"), attention="softplus:reweight=false")
    layer = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 9, 16, dtype=torch.float64)
    k, v = torch.randn(1, 2, 9, 16, dtype=torch.float64), torch.randn(1, 2, 9, 16, dtype=torch.float64)
    got, weights = softplus_attention_forward(layer, q, k, v, None, scaling=0.25)
    assert weights is None and got.is_contiguous()
    torch.testing.assert_close(got, softplus_attention(q, k, v, reweight=False).transpose(1, 2))
    with pytest.raises(ValueError, match="dropout"):
        softplus_attention_forward(layer, q, k, v, None, dropout=0.1)


def test_left_padded_batch_rows_equal_unbatched_runs():
    model = lc.patch(tiny_model("qwen2"), attention="softplus")
    short, long = random_ids(1, 7, seed=3), random_ids(1, 13, seed=4)
    batch = torch.zeros(2, 13, dtype=torch.long)
    batch[0, 6:] = short[0]
    batch[1] = long[0]
    mask = (batch != 0).long()
    out = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for row, single in enumerate((short, long)):
        alone = model.generate(single, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(out[row, 13:], alone[0, single.shape[1]:]), f"row {row}"


def test_training_step_gradients_flow():
    model = lc.patch(tiny_model("llama"), attention=lc.SoftplusAttention(reweight=True, power=15)).train()
    ids = random_ids(2, 16)
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if "q_proj" in name or "k_proj" in name]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()
    assert torch.isfinite(model(ids, labels=ids).loss)


def test_save_and_from_pretrained_reapply(tmp_path):
    model = lc.patch(tiny_model("llama"), attention="softplus:3")
    ids = random_ids(1, 10)
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = lc.from_pretrained(tmp_path).eval()
    assert lc.patched_config(loaded).attention == lc.SoftplusAttention(power=3)
    torch.testing.assert_close(loaded(ids).logits, expected)


@pytest.mark.parametrize("bad, match", [("softplus:0", "power"), ("softplus:power=65", "power"),
                                        ("softplus:reweight=1", "reweight"), ("softplus:p=2", "unknown")])
def test_bad_configs_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        lc.patch(tiny_model("llama"), attention=bad)


def test_layers_with_softcap_or_window_are_refused():
    model = lc.patch(tiny_model("gemma2"), attention="softplus")
    with pytest.raises(ValueError, match="sliding_window|softcap"):
        model(random_ids(1, 8))
