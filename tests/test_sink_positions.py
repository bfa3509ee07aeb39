"""SinkAttention positions: LM-Infinite's distance limit and StreamingLLM's in-cache positions.

The oracle builds queries and keys from un-rotated tensors, rotates every (query, key) pair at the positions
the rule assigns it, and takes a plain softmax; ``sink_attention`` gets the same tensors rotated once at
their true positions, as a model's cache holds them.
"""

import os

import pytest
import torch
from tiny_models import FAMILIES, random_ids, tiny_model

import hf_longctx as lc
from hf_longctx.attention.sink import sink_attention
from hf_longctx.config import parse_feature
from hf_longctx.kernels import reference
from hf_longctx.kernels.reference_remap import rerotate

SINKS, WINDOW = 3, 8
RULES = {
    "original": lc.SinkAttention(SINKS, WINDOW),
    "limit=window": lc.SinkAttention(SINKS, WINDOW, distance_limit=WINDOW),
    "limit=window+5": lc.SinkAttention(SINKS, WINDOW, distance_limit=WINDOW + 5),
    "cache": lc.SinkAttention(SINKS, WINDOW, positions="cache"),
}


def rotate(x, positions, inv_freq):
    """x (B, H, S, D) rotated at integer positions (B, S) (the models' rotate-half RoPE)."""
    return rerotate(x.float(), positions, inv_freq)


def pair_positions(rule, i, j):
    """(query position, key position) at which the rule scores query i against key j, or None if unseen."""
    if j > i:
        return None
    if i - j < rule.window:
        return i, j
    if j >= rule.sink_tokens:
        return None
    if rule.positions == "cache":
        return min(i, rule.sink_tokens + rule.window - 1), j
    distance = i - j if rule.distance_limit is None else min(i - j, rule.distance_limit)
    return j + distance, j


def oracle(rule, q_raw, k_raw, v, inv_freq, scale=None, softcap=None):
    """(B, H, S, D) attention of every query, each pair rotated at the positions of ``pair_positions``."""
    batch, heads, length, dim = q_raw.shape
    groups = heads // k_raw.shape[1]
    k_raw, v = k_raw.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scale = dim**-0.5 if scale is None else scale
    rows = []
    for i in range(length):
        pairs = [(j, pair_positions(rule, i, j)) for j in range(length)]
        pairs = [(j, pos) for j, pos in pairs if pos is not None]
        keys = torch.tensor([j for j, _ in pairs])
        q_pos = torch.tensor([pos[0] for _, pos in pairs]).expand(batch, -1)
        k_pos = torch.tensor([pos[1] for _, pos in pairs]).expand(batch, -1)
        q = rotate(q_raw[:, :, [i] * len(pairs)], q_pos, inv_freq)
        k = rotate(k_raw[:, :, keys], k_pos, inv_freq)
        scores = (q * k).sum(-1) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        rows.append(torch.einsum("bhk,bhkd->bhd", scores.softmax(-1), v[:, :, keys].float()))
    return torch.stack(rows, dim=2)


def raw_inputs(batch=2, heads=4, kv_heads=2, length=40, dim=16, rotary=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, h, length, dim, generator=generator) for h in (heads, kv_heads, kv_heads))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary, 2).float() / rotary)) * 3  # fast enough to matter
    return q, k, v, inv_freq


def positions(batch, length, start=0):
    return torch.arange(start, start + length).expand(batch, -1)


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("variant", ["plain", "softcap", "partial_rotary"])
def test_matches_the_explicit_position_oracle(name, variant):
    rule = RULES[name]
    q_raw, k_raw, v, inv_freq = raw_inputs(rotary=8 if variant == "partial_rotary" else 16)
    softcap = 3.0 if variant == "softcap" else None
    pos = positions(2, 40)
    got = sink_attention(rotate(q_raw, pos, inv_freq), rotate(k_raw, pos, inv_freq), v, feature=rule,
                         inv_freq=inv_freq, scale=0.3, softcap=softcap)
    expected = oracle(rule, q_raw, k_raw, v, inv_freq, scale=0.3, softcap=softcap)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
    if name != "original":  # the rule changed the result: sinks really moved
        plain = oracle(RULES["original"], q_raw, k_raw, v, inv_freq, scale=0.3, softcap=softcap)
        assert (plain - expected).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["limit=window", "cache"])
def test_decode_queries_and_gradients_match_the_oracle(name):
    rule = RULES[name]
    q_raw, k_raw, v, inv_freq = raw_inputs(length=30)
    leaves = [t.clone().requires_grad_() for t in (q_raw, k_raw, v)]
    pos = positions(2, 30)
    got = sink_attention(rotate(leaves[0][:, :, -5:], pos[:, -5:], inv_freq), rotate(leaves[1], pos, inv_freq),
                         leaves[2], feature=rule, inv_freq=inv_freq)
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(3))
    (got * weights).sum().backward()
    grads = [t.grad for t in leaves]
    for t in leaves:
        t.grad = None
    expected = oracle(rule, *leaves, inv_freq)[:, :, -5:]
    (expected * weights).sum().backward()
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
    for got_grad, leaf in zip(grads, leaves):
        torch.testing.assert_close(got_grad, leaf.grad, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("name", ["limit=window", "cache"])
def test_an_evicted_cache_with_its_position_offset_equals_the_full_sequence(name):
    """A cache that kept the sinks and the window's latest tokens (streaming eviction) sees what the full
    sequence sees, once told how many tokens each row evicted."""
    rule = RULES[name]
    length, new = 40, 3
    q_raw, k_raw, v, inv_freq = raw_inputs(length=length)
    pos = positions(2, length)
    q, k = rotate(q_raw, pos, inv_freq), rotate(k_raw, pos, inv_freq)
    kept = list(range(SINKS)) + list(range(length - new - (WINDOW - 1), length))
    evicted = torch.full((2,), length - len(kept))
    got = sink_attention(q[:, :, -new:], k[:, :, kept], v[:, :, kept], feature=rule, inv_freq=inv_freq,
                         position_offset=evicted)
    torch.testing.assert_close(got, oracle(rule, q_raw, k_raw, v, inv_freq)[:, :, -new:], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", ["limit=window", "cache"])
def test_left_padding_and_packed_sequences(name):
    rule = RULES[name]
    q_raw, k_raw, v, inv_freq = raw_inputs(batch=1, length=34)
    pos = positions(1, 34)
    alone = sink_attention(rotate(q_raw, pos, inv_freq), rotate(k_raw, pos, inv_freq), v, feature=rule,
                           inv_freq=inv_freq)
    # Left padding: 6 pads, real tokens at positions 0.. (as transformers numbers them).
    pad = lambda t: torch.cat([torch.randn(*t.shape[:2], 6, t.shape[3]), t], dim=2)  # noqa: E731
    padded_pos = torch.cat([torch.zeros(1, 6, dtype=torch.long), pos], dim=1)
    valid = torch.arange(40)[None] >= 6
    got = sink_attention(rotate(pad(q_raw), padded_pos, inv_freq), rotate(pad(k_raw), padded_pos, inv_freq),
                         pad(v), feature=rule, inv_freq=inv_freq, kv_valid=valid)
    torch.testing.assert_close(got[:, :, 6:], alone, atol=2e-5, rtol=2e-5)
    # Packed: the same sequence after a 25-token one, positions restarting at 0.
    first = raw_inputs(batch=1, length=25, seed=5)
    packed_pos = torch.cat([positions(1, 25), pos], dim=1)
    segments = torch.cat([torch.zeros(1, 25, dtype=torch.long), torch.ones(1, 34, dtype=torch.long)], dim=1)
    cat = lambda a, b: torch.cat([a, b], dim=2)  # noqa: E731
    got = sink_attention(rotate(cat(first[0], q_raw), packed_pos, inv_freq),
                         rotate(cat(first[1], k_raw), packed_pos, inv_freq), cat(first[2], v), feature=rule,
                         inv_freq=inv_freq, segment_ids=segments)
    torch.testing.assert_close(got[:, :, 25:], alone, atol=2e-5, rtol=2e-5)


def test_reference_lse_is_the_log_normaliser():
    q_raw, k_raw, v, _ = raw_inputs(length=20)
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[0, :4] = False
    out, lse = reference.sink_window_attention(q_raw, k_raw, v, sink_tokens=2, window=5, kv_valid=valid,
                                               return_lse=True, query_chunk=7, key_chunk=6)
    torch.testing.assert_close(out, reference.sink_window_attention(q_raw, k_raw, v, sink_tokens=2, window=5,
                                                                    kv_valid=valid))
    scores = torch.einsum("bhqd,bhkd->bhqk", q_raw, k_raw.repeat_interleave(2, 1)) * 16**-0.5
    pos = reference.logical_positions(2, 20, q_raw.device, valid)
    seen = valid[:, None] & (torch.arange(20)[None, :, None] >= torch.arange(20)[None, None, :])
    seen &= (pos[:, None, :] < 2) | (pos[:, :, None] - pos[:, None, :] < 5)
    expected = scores.masked_fill(~seen[:, None], float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse, expected)
    assert torch.isinf(lse[0, :, 0]).all()  # a padding query that sees nothing


@pytest.mark.interpreter
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (make test)")
@pytest.mark.parametrize("s_aux", [False, True])
def test_triton_lse_and_its_gradient_match_the_reference(s_aux):
    from hf_longctx.kernels import sink_window

    q_raw, k_raw, v, _ = raw_inputs(length=40, dim=32)  # a head size the kernel takes
    aux = torch.randn(4) if s_aux else None
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, :7] = False
    results = []
    for attention in (sink_window.sink_window_attention_triton, reference.sink_window_attention):
        leaves = [t.clone().requires_grad_() for t in (q_raw[:, :, -24:], k_raw, v)]
        aux_leaf = None if aux is None else aux.clone().requires_grad_()
        out, lse = attention(*leaves, sink_tokens=3, window=9, s_aux=aux_leaf, kv_valid=valid, return_lse=True)
        live = torch.isfinite(lse)
        (out.square().sum() + torch.where(live, lse, 0).sin().sum()).backward()
        results.append((out, lse, *(t.grad for t in leaves), None if aux is None else aux_leaf.grad))
    for got, expected in zip(*results):
        if got is not None:
            torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["limit=window", "cache"])
def test_cuda_kernel_path_matches_the_float32_reference(name):
    """bf16 through the Triton window kernel + the sink part, against the float32 PyTorch path; gradients too."""
    rule = lc.SinkAttention(4, 256, distance_limit=256) if name == "limit=window" else lc.SinkAttention(
        4, 256, positions="cache")
    q_raw, k_raw, v, inv_freq = raw_inputs(batch=2, heads=8, kv_heads=2, length=1500, dim=64, rotary=64)
    k_raw[:, :, :4] *= 4  # sinks that draw attention, as trained ones do
    pos = positions(2, 1500)
    q, k = rotate(q_raw, pos, inv_freq), rotate(k_raw, pos, inv_freq)
    weights = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    results = []
    for device, dtype in (("cuda", torch.bfloat16), ("cpu", torch.bfloat16), ("cpu", torch.float32)):
        leaves = [t.to(device, dtype, copy=True).requires_grad_() for t in (q, k, v)]
        out = sink_attention(*leaves, feature=rule, inv_freq=inv_freq, kv_valid=torch.ones(2, 1500, dtype=torch.bool,
                                                                                           device=device))
        (out.float() * weights.to(device)).sum().backward()
        grads = [t.float().cpu() for t in (out, *(leaf.grad for leaf in leaves))]
        results.append(grads + [grads[2][:, :, :4], grads[3][:, :, :4]])  # the sinks' dk, dv: sums over all queries
    error = lambda got, expected: ((got - expected).norm() / expected.norm()).item()  # noqa: E731
    for name, cuda, cpu_bf16, expected in zip(("out", "dq", "dk", "dv", "dk_sinks", "dv_sinks"), *results):
        # The project's bf16 rule: no more than twice the error of the bf16 PyTorch path against float32.
        assert error(cuda, expected) <= 2 * error(cpu_bf16, expected) + 1e-3, name


# ----------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("rule", ["sink:4096,4,positions=cache", "sink:64,2,distance_limit=64"])
def test_window_covering_the_sequence_is_stock_for_every_positions_mode(family, rule):
    ids = random_ids(2, 30)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    expected = tiny_model(family).generate(ids, **kwargs)
    assert torch.equal(lc.patch(tiny_model(family), attention=rule).generate(ids, **kwargs), expected)


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
@pytest.mark.parametrize("rule", ["sink:6,2,positions=cache", "sink:6,2,distance_limit=8"])
def test_decoding_through_the_cache_equals_one_forward(family, rule):
    """Prefill + token-by-token decoding (sinks moved per query) gives the logits of one full forward."""
    model = lc.patch(tiny_model(family), attention=rule)
    ids = random_ids(1, 16)
    out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
    with torch.no_grad():
        full = model(out.sequences[:, :-1]).logits[0, 15:]
        plain = lc.patch(tiny_model(family), attention="sink:6,2")(out.sequences[:, :-1]).logits[0, 15:]
    torch.testing.assert_close(torch.cat(out.logits), full, atol=1e-4, rtol=1e-4)
    assert (plain - full).abs().max() > 1e-3  # the rule changed what the model computes


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "spec,message",
    [
        ("sink:64,4,positions=relative", r"unknown `positions` 'relative'; accepted: original, cache"),
        ("sink:64,4,distance_limit=32", r"`distance_limit` must be None or an integer >= window \(64\)"),
        ("sink:64,4,distance_limit=0", r"`distance_limit` must be None or an integer >= window"),
        ("sink:64,4,distance_limit=true", r"`distance_limit` must be None or an integer >= window"),
        ("sink:64,4,positions=cache,distance_limit=128", r"`distance_limit` applies to positions='original' only"),
        ("sink:0", r"`window` must be an integer >= 1, got 0"),
        ("sink:64,-1", r"`sink_tokens` must be an integer >= 0, got -1"),
    ],
)
def test_bad_sink_parameters_raise_naming_them(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_feature("attention", spec)


def test_new_fields_round_trip_and_are_left_out_at_their_defaults():
    config = lc.LongCtxConfig(attention="sink:1024,4,positions=cache")
    assert config.to_dict() == {"attention": {"type": "sink", "sink_tokens": 4, "window": 1024, "positions": "cache"}}
    assert lc.LongCtxConfig.from_dict(config.to_dict()) == config
    limited = lc.LongCtxConfig(attention={"type": "sink", "window": 1024, "distance_limit": 2048})
    assert limited.attention == lc.SinkAttention(window=1024, distance_limit=2048)
    assert lc.LongCtxConfig(attention="sink:1024").to_dict() == {"attention": {"type": "sink", "sink_tokens": 4,
                                                                                 "window": 1024}}
