"""``longctx_sparse`` on tiny models: dense-equivalent selections give stock results; calibration round-trips."""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_ids, tiny_model

import hf_longctx as lc


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_all_blocks_gives_stock_tokens(family):
    model = tiny_model(family)
    ids = random_ids(1, 40)
    with torch.no_grad():
        stock = model(ids).logits
        stock_tokens = model.generate(ids, max_new_tokens=5, do_sample=False)
    lc.patch(model, attention=lc.SparseAttention(pattern="block_topk", density=1.0, min_seq_len=16, block_size=16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, stock, atol=1e-4, rtol=1e-4)
        assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), stock_tokens)
    lc.unpatch(model)


def test_sparse_changes_output_at_low_density():
    model = tiny_model("llama")
    ids = random_ids(1, 96)
    with torch.no_grad():
        stock = model(ids).logits
    lc.patch(model, attention="sparse:block_topk,0.1")
    model.config.longctx["attention"]["min_seq_len"] = 16
    model.config.longctx["attention"]["block_size"] = 16
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, stock, atol=1e-4)


def test_calibrate_round_trips(tmp_path):
    model = tiny_model("llama")
    feature = lc.sparse.calibrate(model, random_ids(1, 80), density=0.5, block_size=16, last_q=8)
    assert feature.pattern == "auto" and len(feature.head_patterns) == 2
    assert all(len(layer) == 4 for layer in feature.head_patterns)
    saved = model.config.longctx["attention"]
    assert saved["head_patterns"] == [list(layer) for layer in feature.head_patterns]
    model.save_pretrained(tmp_path)
    loaded = lc.from_pretrained(str(tmp_path))
    assert lc.patched_config(loaded).attention == feature
    assert loaded.config._attn_implementation == "longctx_sparse"


def test_bad_input():
    with pytest.raises(ValueError, match="density"):
        lc.SparseAttention(density=2.0)
    with pytest.raises(ValueError, match="pattern"):
        lc.SparseAttention(pattern="diagonal")
    with pytest.raises(ValueError, match="block_size"):
        lc.SparseAttention(block_size=48)
    with pytest.raises(ValueError, match="head_patterns"):
        lc.SparseAttention(head_patterns=[["dense"]])
    with pytest.raises(ValueError, match="tokenizer"):
        lc.sparse.calibrate(tiny_model("llama"), "some text")
