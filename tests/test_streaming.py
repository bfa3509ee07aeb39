"""Streaming generation: ``lc.patch(model, attention="sink:...", kv="streaming")`` keeps the sinks and the
window in constant memory, and computes what the sink attention computes over the whole sequence."""

import pytest
import torch
from tiny_models import random_ids, tiny_model

import hf_longctx as lc
from hf_longctx.cache import LongCtxLayer

SINK, WINDOW = 2, 8


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
@pytest.mark.parametrize("positions", ["positions=cache", "distance_limit=10"])
@pytest.mark.parametrize("kv", ["streaming", "streaming:every=4,prefill_chunk=8"])
def test_streaming_generation_equals_the_sink_attention_over_the_whole_sequence(family, positions, kv):
    rule = f"sink:{WINDOW},{SINK},{positions}"
    model = lc.patch(tiny_model(family), attention=rule, kv=kv)
    prompt, new = 20, 24
    out = model.generate(random_ids(1, prompt), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    assert max(out.past_key_values.stored_lengths) < prompt + new - 8  # tokens were evicted
    whole = lc.patch(tiny_model(family), attention=rule)  # no eviction: every key stays in the cache
    with torch.no_grad():
        expected = whole(out.sequences[:, :-1]).logits[0, prompt - 1 :]
    torch.testing.assert_close(torch.cat(out.logits), expected, atol=1e-4, rtol=1e-4)


def test_the_budget_comes_from_the_sink_attention():
    config = lc.LongCtxConfig(attention=f"sink:{WINDOW},6,positions=cache", kv="streaming")
    assert config.kv == lc.KVEviction(policy="streaming", budget=6 + WINDOW - 1, sink_tokens=6)
    assert lc.LongCtxConfig.from_dict(config.to_dict()) == config
    kept_sinks = lc.LongCtxConfig(attention=f"sink:{WINDOW},1", kv="streaming:sink_tokens=3").kv
    assert (kept_sinks.sink_tokens, kept_sinks.budget) == (3, 3 + WINDOW - 1)  # never fewer sinks than asked
    model = lc.patch(tiny_model("llama"), attention=f"sink:{WINDOW},{SINK}", kv="streaming")
    assert lc.LongCtxCache(model, kv="streaming").kv.budget == 4 + WINDOW - 1  # the kv's default 4 sinks


@pytest.mark.parametrize(
    "features,message",
    [
        (dict(kv="streaming"), r"policy 'streaming' needs `budget` \(tokens\) or `ratio`.*attention='sink:"),
        (dict(attention="sink:8,2,positions=cache", kv="snapkv:budget=64,sink_tokens=2,window=4"),
         r"positions='cache' needs the whole window kept: policy 'streaming' with `budget` >= .* = 9"),
        (dict(attention="sink:8,2,positions=cache", kv="streaming:budget=6,sink_tokens=2"),
         r"`budget` >= sink_tokens \+ window - 1 = 9 .* got budget=6"),
        (dict(attention="sink:8,2,positions=cache", kv="streaming:ratio=0.5"), r"got budget=None, ratio=0.5"),
        (dict(attention="sink:8,4,distance_limit=8", kv="streaming:budget=64,sink_tokens=2"),
         r"`sink_tokens` \(2\) must be at least the attention's \(4\)"),
    ],
)
def test_incompatible_eviction_raises_naming_the_parameter(features, message):
    with pytest.raises(ValueError, match=message):
        lc.patch(tiny_model("llama"), **features)


def test_constant_memory_over_three_budgets():
    model = lc.patch(tiny_model("llama"), attention=f"sink:{WINDOW},{SINK},positions=cache", kv="streaming")
    budget = lc.patched_config(model).kv.budget
    sizes = []
    original = LongCtxLayer.update

    def recording_update(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if self.layer_idx == 0:
            sizes.append((self.stored_length, self.capacity, self.keys.data_ptr(), self.keys.numel()))
        return result

    LongCtxLayer.update = recording_update
    try:
        out = model.generate(random_ids(1, 6), max_new_tokens=3 * budget, min_new_tokens=3 * budget, do_sample=False,
                             return_dict_in_generate=True)
    finally:
        LongCtxLayer.update = original
    assert out.past_key_values.get_seq_length() == 6 + 3 * budget - 1
    steady = sizes[budget:]  # once the budget is reached: evict one, write one, in the same buffers
    assert {stored for stored, *_ in steady} == {budget + 1}
    assert len({(capacity, pointer, numel) for _, capacity, pointer, numel in steady}) == 1


def test_left_padded_rows_equal_unbatched_runs():
    model = lc.patch(tiny_model("llama"), attention=f"sink:{WINDOW},{SINK},positions=cache", kv="streaming")
    short, long = random_ids(1, 11, seed=3), random_ids(1, 19, seed=4)
    batch = torch.zeros(2, 19, dtype=torch.long)
    batch[0, 8:], batch[1] = short[0], long[0]
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[0, :8] = 0
    kwargs = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    out = model.generate(batch, attention_mask=mask, **kwargs)
    for row, single in enumerate((short, long)):
        alone = model.generate(single, **kwargs)
        assert torch.equal(out[row, 19:], alone[0, single.shape[1] :]), f"row {row}"
