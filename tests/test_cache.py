"""LongCtxCache: same tokens as DynamicCache without eviction, preallocation, lengths, rollback,
beams, reuse across turns, hybrid layouts, and how generate picks it up."""

import pytest
import torch
from tiny_models import FAMILIES, STOCK_ATTENTION, random_ids, tiny_model
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

import hf_longctx as lc
from hf_longctx.cache import LongCtxLayer

FAMILY_NAMES = list(FAMILIES)


def generate(model, ids, cache=None, seed=None, **kwargs):
    if seed is not None:
        torch.manual_seed(seed)
    kwargs.setdefault("max_new_tokens", 10)
    kwargs.setdefault("min_new_tokens", kwargs["max_new_tokens"])
    return model.generate(ids, past_key_values=cache, **kwargs)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_without_eviction_tokens_equal_dynamic_cache(family):
    model = tiny_model(family)
    ids = random_ids(2, 21)
    modes = [
        dict(do_sample=False),
        dict(do_sample=True, top_k=20, seed=7),
        dict(do_sample=False, num_beams=3, num_return_sequences=2),
        dict(do_sample=True, num_return_sequences=3, seed=11),
    ]
    for mode in modes:
        expected = generate(model, ids, **mode)
        got = generate(model, ids, lc.LongCtxCache(model), **mode)
        assert torch.equal(got, expected), mode


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_the_kv_attention_without_eviction_equals_stock(family):
    stock = tiny_model(family)
    ids = random_ids(2, 25)
    expected = generate(stock, ids, max_new_tokens=8)
    model = tiny_model(family, attn_implementation="longctx_kv")
    assert torch.equal(generate(model, ids, lc.LongCtxCache(model), max_new_tokens=8), expected)


def test_hybrid_model_keeps_its_sliding_layers():
    model = tiny_model("gemma2")
    cache = lc.LongCtxCache(model)
    assert isinstance(cache.layers[0], DynamicSlidingWindowLayer) and isinstance(cache.layers[1], LongCtxLayer)
    generate(model, random_ids(1, 40), cache, max_new_tokens=5)
    assert cache.get_seq_length() == 44 and cache.stored_lengths == [44]
    assert cache.layers[0].keys.shape[-2] == model.config.sliding_window - 1


def test_preallocated_buffers_are_written_in_place():
    model = tiny_model("llama")
    cache = lc.LongCtxCache(model)
    pointers = []
    original = LongCtxLayer.update

    def recording_update(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        pointers.append((self.layer_idx, self.keys.data_ptr(), self.capacity))
        return result

    LongCtxLayer.update = recording_update
    try:
        model.generate(random_ids(1, 100), past_key_values=cache, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    finally:
        LongCtxLayer.update = original
    first_layer = [(pointer, capacity) for layer, pointer, capacity in pointers if layer == 0]
    assert len(set(first_layer)) == 2 and first_layer[-1][1] == 256  # 100 tokens -> 128, then doubled once
    assert len(pointers) == 2 * 40  # one prefill + 39 decoding updates per layer


def test_generate_reserves_the_whole_length_once():
    model = lc.patch(tiny_model("qwen2"), kv="streaming:budget=2000,sink_tokens=2")
    out = generate(model, random_ids(1, 30), max_new_tokens=200, return_dict_in_generate=True)
    assert [layer.capacity for layer in out.past_key_values.layers] == [256, 256]  # grown: it may evict
    lc.unpatch(model)
    cache = lc.LongCtxCache(model, reserve=230)
    model.generate(random_ids(1, 30), past_key_values=cache, max_new_tokens=200, min_new_tokens=200, do_sample=False)
    assert [layer.capacity for layer in cache.layers] == [256, 256]


def test_fixed_capacity_raises_naming_it():
    model = tiny_model("llama")
    cache = lc.LongCtxCache(model, capacity=32)
    generate(model, random_ids(1, 20), cache, max_new_tokens=5)
    assert [layer.capacity for layer in cache.layers] == [32, 32]
    with pytest.raises(ValueError, match=r"`capacity` \(32 tokens\) is too small for the 33 tokens"):
        generate(model, random_ids(1, 20), lc.LongCtxCache(model, capacity=32), max_new_tokens=20)


def test_reuse_across_turns_equals_dynamic_cache():
    model = tiny_model("qwen3")
    first, reply = random_ids(1, 15, seed=2), random_ids(1, 6, seed=3)
    outputs = []
    for cache in (DynamicCache(config=model.config), lc.LongCtxCache(model)):
        turn = generate(model, first, cache, max_new_tokens=6)
        conversation = torch.cat([turn, reply], dim=1)
        outputs.append(generate(model, conversation, cache, max_new_tokens=6))
        assert cache.get_seq_length() == conversation.shape[1] + 5
    assert torch.equal(outputs[0], outputs[1])


def test_reuse_across_turns_with_eviction():
    model = lc.patch(tiny_model("llama"), kv="snapkv:budget=16,sink_tokens=2,window=4,recent=4")
    cache = lc.LongCtxCache(model, kv=lc.patched_config(model).kv)
    turn = generate(model, random_ids(1, 30), cache, max_new_tokens=6)
    assert cache.get_seq_length() == 35 and cache.stored_lengths == [17, 17]
    conversation = torch.cat([turn, random_ids(1, 9, seed=5)], dim=1)
    generate(model, conversation, cache, max_new_tokens=6)
    assert cache.get_seq_length() == conversation.shape[1] + 5 and cache.stored_lengths == [17, 17]


def test_mask_sizes_and_lengths_follow_eviction():
    model = lc.patch(tiny_model("mistral"), kv="streaming:budget=10,sink_tokens=2")
    cache = lc.LongCtxCache(model, kv=lc.patched_config(model).kv)
    with torch.no_grad():
        model(random_ids(1, 30), past_key_values=cache)
    assert cache.get_seq_length() == 30 and cache.stored_lengths == [30, 30]
    assert cache.get_mask_sizes(1, 0) == (11, 20)  # evicts to 10 before the next token
    with torch.no_grad():
        model(random_ids(1, 1), past_key_values=cache)
    assert cache.get_seq_length() == 31 and cache.stored_lengths == [11, 11]
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.stored_lengths == [0, 0]


@pytest.mark.parametrize("kv", [None, "h2o:budget=24,sink_tokens=2,window=4,recent=8"])
def test_assisted_decoding_rolls_back_rejected_tokens(kv):
    target = tiny_model("llama")
    assistant = tiny_model("llama", seed=1)
    ids = random_ids(1, 20)
    if kv is None:
        expected = generate(target, ids, max_new_tokens=12)
        cache = lc.LongCtxCache(target)
        got = generate(target, ids, cache, max_new_tokens=12, assistant_model=assistant)
        assert torch.equal(got, expected)
    else:
        lc.patch(target, kv=kv)
        out = generate(target, ids, max_new_tokens=12, assistant_model=assistant, return_dict_in_generate=True)
        cache = out.past_key_values
        assert isinstance(cache, lc.LongCtxCache) and max(cache.stored_lengths) <= 24 + 1
    assert cache.get_seq_length() == ids.shape[1] + 11


def test_crop_cannot_remove_evicted_tokens():
    model = lc.patch(tiny_model("llama"), kv="streaming:budget=10,sink_tokens=2")
    cache = lc.LongCtxCache(model, kv=lc.patched_config(model).kv)
    generate(model, random_ids(1, 20), cache, max_new_tokens=4)
    assert cache.get_seq_length() == 23 and cache.stored_lengths == [11, 11]
    cache.crop(-1)  # the last token was written after the last eviction
    assert cache.get_seq_length() == 22 and cache.stored_lengths == [10, 10]
    with pytest.raises(ValueError, match="cannot crop 20 tokens.*activate_past_recording"):
        cache.crop(-20)
    cache.activate_past_recording()
    with torch.no_grad():
        model(random_ids(1, 5), past_key_values=cache)  # no eviction while recording
    assert cache.stored_lengths == [15, 15]
    cache.crop(-3)  # drop 3, then the deferred eviction
    assert cache.get_seq_length() == 24 and cache.stored_lengths == [10, 10]


def test_batch_changes_carry_the_slot_metadata():
    layer = LongCtxLayer()
    keys = torch.arange(3.0)[:, None, None, None].expand(3, 2, 5, 4).clone()
    layer.update(keys, keys.clone())
    layer.valid[0, :2] = False
    layer.scores[:, :, :5] = torch.arange(3.0)[:, None, None]
    layer.reorder_cache(torch.tensor([2, 0, 0]))
    assert layer.keys[:, 0, 0, 0].tolist() == [2.0, 0.0, 0.0] and layer.scores[:, 0, 0].tolist() == [2.0, 0.0, 0.0]
    assert layer.valid[:, :5].sum(-1).tolist() == [5, 3, 3]
    layer.batch_select_indices(torch.tensor([0, 2]))
    layer.batch_repeat_interleave(2)
    assert layer.keys[:, 0, 0, 0].tolist() == [2.0, 2.0, 0.0, 0.0]
    assert layer.valid[:, :5].sum(-1).tolist() == [5, 5, 3, 3]


def test_patch_makes_generate_build_the_cache_and_unpatch_restores():
    model = tiny_model("phi3")
    attrs_before, config_before = set(model.__dict__), model.config.to_dict()
    spec = "tova:budget=20,sink_tokens=2,window=4,recent=4"
    lc.patch(model, kv=spec)
    assert model.config._attn_implementation == "longctx_kv"
    assert model.config.longctx == lc.LongCtxConfig(kv=spec).to_dict()
    out = model.generate(random_ids(1, 30), max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, lc.LongCtxCache) and out.past_key_values.stored_lengths == [21, 21]
    explicit = generate(model, random_ids(1, 30), max_new_tokens=2, cache_implementation="dynamic",
                        return_dict_in_generate=True)
    assert type(explicit.past_key_values) is DynamicCache  # an explicit cache_implementation wins
    lc.unpatch(model)
    assert set(model.__dict__) == attrs_before and model.config.to_dict() == config_before
    assert model.config._attn_implementation == STOCK_ATTENTION["phi3"]
    out = model.generate(random_ids(1, 30), max_new_tokens=2, return_dict_in_generate=True)
    assert type(out.past_key_values) is DynamicCache


def test_kv_config_persists_through_save_and_from_pretrained(tmp_path):
    model = lc.patch(tiny_model("qwen2"), kv="h2o:budget=20,sink_tokens=2,window=4,recent=4,prefill_chunk=16")
    model.save_pretrained(tmp_path)
    loaded = lc.from_pretrained(tmp_path)
    assert lc.patched_config(loaded) == lc.patched_config(model)
    ids = random_ids(1, 40)
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(loaded.generate(ids, max_new_tokens=6, do_sample=False), expected)
