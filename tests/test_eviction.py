"""KV eviction: KVEviction validation, the policies, memory really freed, left-padded batches."""

import pytest
import torch
from tiny_models import FAMILIES, STOCK_ATTENTION, random_ids, tiny_model

import hf_longctx as lc
from hf_longctx.cache import LongCtxLayer, make_policies, policies
from hf_longctx.cache.scores import attention_mass, pool_along_keys
from hf_longctx.config import parse_feature

SMALL = "sink_tokens=2,window=4,recent=4"
POLICIES = [
    "streaming:budget=12,sink_tokens=2",
    f"snapkv:budget=14,{SMALL}",
    f"h2o:budget=14,{SMALL}",
    f"tova:budget=14,{SMALL}",
    f"pyramidkv:budget=14,{SMALL}",
    f"kvcrush:budget=14,{SMALL},representatives=0.5",
    f"think:budget=14,{SMALL},channels=0.5",
]


def policy_id(spec):
    return spec.split(":")[0]


# ---------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "spec,message",
    [
        ("snapkv:8", r"`budget` \(8\) must be at least sink_tokens \+ recent \(4 \+ 32 = 36\)"),
        ({"type": "h2o", "budget": 10, "sink_tokens": 4, "window": 8}, r"`budget` \(10\) must be at least"),
        ("bogus:64", r"unknown kv 'bogus'; known: 'h2o', 'kvcrush', 'pyramidkv', 'snapkv', 'streaming', 'think'"),
        ("snapkv:ratio=1.5", r"`ratio` must be a number in \(0, 1\], got 1.5"),
        ("snapkv:ratio=0", r"`ratio` must be a number in \(0, 1\], got 0"),
        ("snapkv:budget=64,ratio=0.5", r"give `budget` \(tokens\) or `ratio`"),
        ("snapkv", r"policy 'snapkv' needs `budget` \(tokens\) or `ratio`"),
        ("snapkv:budget=64,pooling=4", r"`pooling` must be an odd kernel size"),
        ("kvcrush:budget=64,base=kvcrush", r"unknown `base` 'kvcrush'; accepted: streaming, snapkv, h2o, tova"),
        ("snapkv:budget=64,every=0", r"`every` must be an integer >= 1"),
    ],
)
def test_bad_eviction_parameters_raise_naming_them(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_feature("kv", spec)


def test_unknown_policy_in_the_dataclass():
    with pytest.raises(ValueError, match="unknown `policy` 'lru'; accepted: streaming, snapkv"):
        lc.KVEviction(policy="lru", budget=64)


def test_shorthand_dict_and_dataclass_spell_the_same_eviction():
    expected = lc.KVEviction(policy="snapkv", budget=2048)
    assert parse_feature("kv", "snapkv:2048") == expected
    assert parse_feature("kv", {"type": "snapkv", "budget": 2048}) == expected
    config = lc.LongCtxConfig(kv="snapkv:2048")
    assert config.to_dict()["kv"]["type"] == "snapkv" and "policy" not in config.to_dict()["kv"]
    assert lc.LongCtxConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="`policy` 'h2o' contradicts the name 'snapkv'"):
        parse_feature("kv", {"type": "snapkv", "policy": "h2o", "budget": 64})


def test_eviction_cache_needs_the_kv_attention():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="needs the model's attention implementation to be 'longctx_kv'.*'sdpa'"):
        lc.LongCtxCache(model, kv="streaming:16")
    model.set_attn_implementation("longctx_kv")
    cache = lc.LongCtxCache(model, kv="streaming:16")
    model.set_attn_implementation("sdpa")  # the attention no longer reports to the cache
    with pytest.raises(RuntimeError, match="no attention function reported"):
        model.generate(random_ids(1, 20), max_new_tokens=3, past_key_values=cache)


# ------------------------------------------------------------------------------ score math
def test_attention_mass_equals_the_explicit_softmax():
    torch.manual_seed(0)
    batch, heads, kv_heads, queries, stored, dim = 2, 4, 2, 5, 9, 8
    query, key = torch.randn(batch, heads, queries, dim), torch.randn(batch, kv_heads, stored, dim)
    valid = torch.ones(batch, stored, dtype=torch.bool)
    valid[0, :3] = False  # a left-padded row
    got = attention_mass(query, key, scale=0.3, softcap=2.0, valid=valid)

    scores = torch.einsum("bhqd,bhkd->bhqk", query, key.repeat_interleave(heads // kv_heads, dim=1)) * 0.3
    scores = 2.0 * torch.tanh(scores / 2.0)
    slots = torch.arange(stored - queries, stored)
    visible = valid[:, None, None, :] & (torch.arange(stored)[None, :] <= slots[:, None])
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1) * valid[:, None, slots, None]
    expected = probs.sum(2).reshape(batch, kv_heads, heads // kv_heads, stored).mean(2)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_pooling_skips_padding():
    scores = torch.tensor([[[0.0, 0.0, 3.0, 6.0, 9.0]]])
    valid = torch.tensor([[False, False, True, True, True]])
    unpadded = pool_along_keys(scores[..., 2:], 3)
    torch.testing.assert_close(pool_along_keys(scores, 3, valid)[..., 2:], unpadded)
    torch.testing.assert_close(unpadded, torch.tensor([[[4.5, 6.0, 7.5]]]))


# -------------------------------------------------------------------------- eviction mechanics
def filled_layer(spec, batch=1, kv_heads=2, stored=20, dim=4, scores=None, valid=None):
    """A LongCtxLayer holding `stored` tokens whose keys encode their slot (key[..., 0] = slot)."""
    layer = LongCtxLayer(make_policies(parse_feature("kv", spec), 1)[0], layer_idx=0)
    keys = torch.arange(stored, dtype=torch.float32)[None, None, :, None].expand(batch, kv_heads, stored, dim)
    layer.update(keys.clone(), keys.clone())
    layer._awaiting_report = False
    if valid is not None:
        layer.valid[:, :stored] = valid
    if scores is not None:
        layer.scores[:, :, :stored] = scores
    return layer


def step(layer, slot=0.0, batch=1):
    """One decoding update of a token whose key encodes `slot`, as if attention had reported."""
    layer.update(torch.full((batch, 2, 1, 4), float(slot)), torch.zeros(batch, 2, 1, 4))
    layer._awaiting_report = False


def kept_slots(layer):
    return layer.keys[:, :, : layer.stored_length, 0].long()


def test_selection_keeps_sinks_recent_and_the_top_scores_per_head():
    scores = torch.zeros(1, 2, 20)
    scores[0, 0, [7, 9]] = 1.0  # head 0 prefers slots 7 and 9
    scores[0, 1, [5, 11]] = 1.0  # head 1 prefers 5 and 11
    layer = filled_layer("h2o:budget=8,sink_tokens=2,recent=4", scores=scores)
    assert layer.get_mask_sizes(1) == (9, 12)  # an eviction to 8 is due: 8 kept + 1 query, 12 dropped
    step(layer, 20)
    assert kept_slots(layer).tolist() == [[[0, 1, 7, 9, 16, 17, 18, 19, 20], [0, 1, 5, 11, 16, 17, 18, 19, 20]]]
    assert layer.stored_length == 9 and layer.get_seq_length() == 21
    assert torch.equal(layer.scores[0, 0, :4], torch.tensor([0.0, 0.0, 1.0, 1.0]))  # scores follow their slots


def test_a_padded_row_keeps_all_its_real_tokens_and_pads_first():
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[0, :15] = False  # row 0: 5 real tokens, fewer than the budget
    valid[1, 3:6] = False  # row 1: a hole of padding
    layer = filled_layer("streaming:budget=8,sink_tokens=2", batch=2, valid=valid)
    step(layer, 20, batch=2)
    kept = kept_slots(layer)[:, 0]
    assert kept[0, 3:].tolist() == [15, 16, 17, 18, 19, 20]  # 3 pads, then every real token in order
    assert kept[1].tolist() == [0, 1, 14, 15, 16, 17, 18, 19, 20]  # sinks + most recent; no pad kept
    assert layer.valid[:, :9].tolist() == [[False] * 3 + [True] * 6, [True] * 9]


def test_eviction_frees_memory_and_writes_in_place():
    layer = filled_layer("streaming:budget=8,sink_tokens=2", stored=1000)
    assert layer.capacity >= 1000
    step(layer)
    # shrunk to what it can ever hold: budget + max(every, prefill_chunk, the write) = 8 + 1
    assert layer.stored_length == 9 and layer.capacity == 9 and layer.keys.shape == (1, 2, 9, 4)
    buffer = layer.keys.data_ptr()
    for _ in range(5):  # decoding: evict one, write one, in the same buffers
        step(layer)
    assert layer.keys.data_ptr() == buffer and layer.stored_length == 9 and layer.get_seq_length() == 1006


def test_every_amortises_eviction():
    layer = filled_layer("streaming:budget=8,sink_tokens=2,every=4", stored=8)
    for _ in range(6):
        step(layer)
    # 8 -> 9 -> 10 -> 11 -> 12 -> (evict to 8) 9 -> 10
    assert layer.stored_length == 10 and layer.get_seq_length() == 14


def test_kvcrush_adds_representatives_of_the_evicted_tokens():
    scores = torch.zeros(1, 2, 20)
    scores[0, 0, 2:8] = 1.0  # slots 2..7: attended by head 0 only (signature 10)
    scores[0, 1, 8:14] = 0.9  # slots 8..13: by head 1 only (signature 01); 14..17 by neither (00)
    scores[0, :, 6] = 5.0  # the base policy's favourites: 6, then 7
    scores[0, 0, 7] = 2.0
    layer = filled_layer("kvcrush:budget=8,sink_tokens=2,recent=2,base=h2o,representatives=0.5", scores=scores)
    step(layer, 20)
    # Base: sinks 0, 1, recent 18, 19, top scores 6, 7. The other 14 real tokens, ordered by distance
    # to the all-ones signature then position, are [2..5, 8..13 | 14..17]: 2 representatives from
    # evenly spaced places, 2 and 11.
    assert kept_slots(layer)[0].tolist() == [[0, 1, 2, 6, 7, 11, 18, 19, 20]] * 2


# --------------------------------------------------------------------------- through generate
def sink_window_mask(total, prompt, sink, recent):
    """(1, 1, T, T) bool: dense causal for the prompt; a decoding query at p sees the first `sink`
    tokens and positions p - recent .. p (streaming eviction with every=1)."""
    pos = torch.arange(total)
    causal = pos[None] <= pos[:, None]
    window = (pos[None] < sink) | (pos[:, None] - pos[None] <= recent)
    return (causal & ((pos[:, None] < prompt) | window))[None, None]


def additive(mask):
    return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_streaming_equals_the_stock_model_with_the_explicit_mask(family):
    sink, budget, prompt, new = 2, 10, 24, 10
    model = lc.patch(tiny_model(family), kv=f"streaming:budget={budget},sink_tokens={sink}")
    out = model.generate(
        random_ids(1, prompt), max_new_tokens=new, min_new_tokens=new, do_sample=False,
        return_dict_in_generate=True, output_logits=True,
    )
    assert out.past_key_values.stored_lengths[-1] == budget + 1
    sequence = out.sequences[:, :-1]
    mask = sink_window_mask(sequence.shape[1], prompt, sink, budget - sink)
    stock = tiny_model(family)
    if family == "gemma2":  # the local layer keeps its own sliding window, uncut by eviction
        pos = torch.arange(sequence.shape[1])
        local = ((pos[None] <= pos[:, None]) & (pos[:, None] - pos[None] < stock.config.sliding_window))[None, None]
        mask = {"full_attention": additive(mask), "sliding_attention": additive(local)}
    with torch.no_grad():
        expected = stock(sequence, attention_mask=mask).logits[0, prompt - 1 :]
    torch.testing.assert_close(torch.cat(out.logits), expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # and eviction really changed what the model computes
        assert (stock(sequence).logits[0, prompt - 1 :] - expected).abs().max() > 1e-3


def left_padded_batch(pad):
    short, long = random_ids(1, 11, seed=3), random_ids(1, 19, seed=4)
    batch = torch.full((2, 19), pad)
    batch[0, 8:] = short[0]
    batch[1] = long[0]
    mask = (batch != pad).long()
    mask[1] = 1
    return (short, long), batch, mask


def assert_rows_equal_unbatched(model, new=12):
    pad = model.config.pad_token_id
    singles, batch, mask = left_padded_batch(pad)
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad)
    out = model.generate(batch, attention_mask=mask, return_dict_in_generate=True, **kwargs)
    stored = out.past_key_values.stored_lengths
    for row, single in enumerate(singles):
        alone = model.generate(single, **kwargs)
        assert torch.equal(out.sequences[row, 19:], alone[0, single.shape[1] :]), f"row {row}"
    return stored


@pytest.mark.parametrize("spec", POLICIES, ids=policy_id)
def test_left_padded_rows_equal_unbatched_runs_under_eviction(spec):
    model = lc.patch(tiny_model("llama"), kv=spec)
    stored = assert_rows_equal_unbatched(model)
    feature = parse_feature("kv", spec)
    assert max(stored) <= round(1.5 * feature.budget) + 1 < 19 + 12  # eviction happened


@pytest.mark.parametrize("family", [name for name in FAMILIES if name != "llama"])
def test_left_padded_rows_equal_unbatched_runs_snapkv_every_family(family):
    assert_rows_equal_unbatched(lc.patch(tiny_model(family), kv=f"snapkv:budget=14,{SMALL}"))


def test_pyramidkv_budgets_fall_with_depth():
    model = lc.patch(tiny_model("qwen2"), kv=f"pyramidkv:budget=20,{SMALL}")
    out = model.generate(random_ids(1, 60), max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert out.past_key_values.stored_lengths == [31, 11]  # 1.5x and 0.5x the budget, + the last token


def test_ratio_budget_follows_the_prompt():
    model = lc.patch(tiny_model("llama"), kv=f"snapkv:ratio=0.25,{SMALL}")
    out = model.generate(random_ids(1, 80), max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert out.past_key_values.stored_lengths == [21, 21]  # ceil(0.25 * 80) + the last token


def test_think_stores_fewer_key_channels():
    model = lc.patch(tiny_model("qwen3"), kv="think:channels=0.5")
    ids = random_ids(1, 40)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    layer = out.past_key_values.layers[0]
    assert layer.keys.shape[-1] == 8 and layer.values.shape[-1] == 16 and layer.stored_length == 45
    lc.patch(model, kv="think:channels=1.0")  # keeping every channel is exact
    full = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(full, tiny_model("qwen3").generate(ids, max_new_tokens=6, do_sample=False))


def test_chunked_prefill_bounds_the_stored_tokens():
    model = lc.patch(tiny_model("mistral"), kv=f"snapkv:budget=16,{SMALL},prefill_chunk=8")
    peaks = []
    original = LongCtxLayer.update

    def recording_update(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        peaks.append(self.capacity)
        return result

    LongCtxLayer.update = recording_update
    try:
        out = model.generate(random_ids(1, 100), max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    finally:
        LongCtxLayer.update = original
    assert out.past_key_values.get_seq_length() == 102
    # budget + chunk from the first chunk on: never the whole prompt, never doubled past it
    assert set(peaks) == {24} and out.past_key_values.stored_lengths == [17, 17]


def test_sink_attention_and_eviction_together():
    model = lc.patch(tiny_model("llama"), attention="sink:8,2", kv="streaming:budget=24,sink_tokens=2")
    assert model.config._attn_implementation == "longctx_kv"
    out = model.generate(random_ids(1, 40), max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert out.past_key_values.stored_lengths == [25, 25]
    lc.unpatch(model)
    assert model.config._attn_implementation == STOCK_ATTENTION["llama"]


def test_beams_and_return_sequences_under_eviction():
    ids = random_ids(2, 20)
    kwargs = dict(num_beams=3, num_return_sequences=2, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    expected = tiny_model("qwen2").generate(ids, **kwargs)
    unreached = lc.patch(tiny_model("qwen2"), kv=f"h2o:budget=100,{SMALL}")
    assert torch.equal(unreached.generate(ids, **kwargs), expected)  # a budget never reached changes nothing
    model = lc.patch(tiny_model("qwen2"), kv=f"h2o:budget=14,{SMALL}")
    out = model.generate(ids, return_dict_in_generate=True, **kwargs)
    assert out.sequences.shape == (4, 28) and out.past_key_values.stored_lengths == [15, 15]


# ------------------------------------------------------------------ buffer bound and scoring cost
@pytest.mark.parametrize("every", [1, 48])
def test_an_evicting_layer_holds_exactly_budget_plus_chunk(every):
    model = lc.patch(tiny_model("llama"), kv=f"snapkv:budget=256,prefill_chunk=128,every={every}")
    seen = []
    original = LongCtxLayer.update

    def recording_update(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        seen.append((self.capacity, self.stored_length, self.keys.data_ptr()))
        return result

    LongCtxLayer.update = recording_update
    try:
        out = model.generate(random_ids(1, 1024), max_new_tokens=60, do_sample=False, return_dict_in_generate=True)
    finally:
        LongCtxLayer.update = original
    bound = 256 + max(128, every)
    assert {capacity for capacity, _, _ in seen} == {bound}  # prefill and decoding: one allocation
    assert len({pointer for _, _, pointer in seen[::2]}) == 1  # layer 0 wrote in place throughout
    assert max(stored for _, stored, _ in seen) == bound
    assert [layer.capacity for layer in out.past_key_values.layers] == [bound, bound]


def test_a_chunk_after_decoding_evicts_first():
    layer = filled_layer("streaming:budget=8,sink_tokens=2,every=4", stored=8)
    step(layer)
    step(layer)  # 10 stored, under budget + every: one-token steps would not evict yet
    assert layer.get_mask_sizes(6) == (14, 2)  # but a 6-token write evicts to 8 first: 8 kept + 6
    layer.update(torch.zeros(1, 2, 6, 4), torch.zeros(1, 2, 6, 4))
    assert layer.stored_length == 14 and layer.capacity == 14  # budget + max(every, write)


def counting_attention_mass(monkeypatch):
    calls = []
    original = policies.attention_mass

    def counting(query, *args, **kwargs):
        calls.append(query.shape[2])
        return original(query, *args, **kwargs)

    monkeypatch.setattr(policies, "attention_mass", counting)
    return calls


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "tova"])
def test_decoding_steps_that_do_not_evict_score_nothing(monkeypatch, policy):
    model = lc.patch(tiny_model("llama"), kv=f"{policy}:budget=40,{SMALL},every=8")
    calls = counting_attention_mass(monkeypatch)
    cache = lc.LongCtxCache(model, kv=lc.patched_config(model).kv)
    with torch.no_grad():
        model(random_ids(1, 30), past_key_values=cache)  # the prefill: scored at once
        assert calls == [4 if policy == "snapkv" else 30 if policy == "h2o" else 1] * 2
        for token in range(18):  # 30 -> 48 stored: still under budget + every
            model(random_ids(1, 1, seed=token), past_key_values=cache)
        assert len(calls) == 2 and [len(layer._pending) for layer in cache.layers] == [18, 18]
        model(random_ids(1, 1, seed=99), past_key_values=cache)  # 48 stored: this step evicts to 40
    scored = 1 if policy == "tova" else 18  # the 18 steps' queries scored once (TOVA: the latest one)
    assert calls[2:] == [scored, scored] and cache.stored_lengths == [41, 41]


@pytest.mark.parametrize("spec", ["snapkv:budget=14", "h2o:budget=14", "tova:budget=14", "pyramidkv:budget=14"])
def test_deferred_scoring_evicts_as_scoring_every_step(spec):
    """every=1: a step's query is scored just before the next step's eviction, over the same keys it attended,
    so the kept tokens equal those of scoring each query at its own step (the previous implementation)."""
    spec = f"{spec},{SMALL},pooling=3"
    ids = random_ids(1, 30)
    model = lc.patch(tiny_model("llama"), kv=spec)
    out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    eager = lc.patch(tiny_model("llama"), kv=spec)
    original = LongCtxLayer.observe

    def scoring_every_step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        self._score_pending()
        return result

    LongCtxLayer.observe = scoring_every_step
    try:
        expected = eager.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                  return_dict_in_generate=True)
    finally:
        LongCtxLayer.observe = original
    assert torch.equal(out.sequences, expected.sequences)
    for got, want in zip(out.past_key_values.layers, expected.past_key_values.layers):
        assert len(got._pending) == 1 and not want._pending  # the last step's query waits for an eviction
        got._score_pending()
        assert torch.equal(got.keys[:, :, : got.stored_length], want.keys[:, :, : want.stored_length])
        torch.testing.assert_close(got.scores[:, :, : got.stored_length], want.scores[:, :, : want.stored_length])
