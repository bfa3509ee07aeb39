"""The PyTorch sink/window reference against a float64 explicit-mask softmax."""

import math

import pytest
import torch

from hf_longctx.kernels.reference import logical_positions, sink_window_attention


def explicit_mask(batch, q_len, kv_len, sink, window, kv_valid=None, segment_ids=None):
    """(B, Sq, Skv) bool visibility, written out element by element from the rule."""
    pos = logical_positions(batch, kv_len, torch.device("cpu"), kv_valid, segment_ids)
    mask = torch.zeros(batch, q_len, kv_len, dtype=torch.bool)
    for b in range(batch):
        for qi in range(q_len):
            i = kv_len - q_len + qi
            for j in range(i + 1):
                if kv_valid is not None and not kv_valid[b, j]:
                    continue
                if segment_ids is not None and segment_ids[b, i] != segment_ids[b, j]:
                    continue
                if window is None or pos[b, j] < sink or pos[b, i] - pos[b, j] < window:
                    mask[b, qi, j] = True
    return mask


def oracle(q, k, v, mask, scale=None, softcap=None, s_aux=None):
    """float64 softmax attention with an explicit mask; rows with no visible key give zeros."""
    groups = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(groups, 1)
    v = v.double().repeat_interleave(groups, 1)
    scores = q.double() @ k.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask[:, None], -math.inf)
    if s_aux is not None:
        aux = s_aux.double().view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        scores = torch.cat([scores, aux], dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    if s_aux is not None:
        probs = probs[..., :-1]
    return probs @ v


CASES = [
    # batch, heads, kv_heads, q_len, kv_len, sink, window
    (2, 4, 2, 37, 37, 3, 5),
    (1, 4, 1, 1, 50, 2, 7),  # decode
    (2, 2, 2, 20, 45, 0, 9),  # chunked prefill, no sinks
    (1, 4, 2, 70, 70, 4, None),  # dense causal
    (1, 2, 1, 33, 90, 4, 100),  # window longer than the sequence
]


@pytest.mark.parametrize("batch,heads,kv_heads,q_len,kv_len,sink,window", CASES)
@pytest.mark.parametrize("variant", ["plain", "padding", "softcap", "s_aux"])
def test_matches_explicit_mask(batch, heads, kv_heads, q_len, kv_len, sink, window, variant):
    torch.manual_seed(0)
    q = torch.randn(batch, heads, q_len, 16)
    k, v = torch.randn(2, batch, kv_heads, kv_len, 16)
    kv_valid = softcap = s_aux = None
    if variant == "padding":
        kv_valid = torch.ones(batch, kv_len, dtype=torch.bool)
        kv_valid[0, :5] = False  # left padding on the first row
    if variant == "softcap":
        softcap = 3.0
    if variant == "s_aux":
        s_aux = torch.randn(heads)
    out = sink_window_attention(
        q, k, v, sink_tokens=sink, window=window, kv_valid=kv_valid, softcap=softcap, s_aux=s_aux,
        query_chunk=16, key_chunk=32,
    )
    mask = explicit_mask(batch, q_len, kv_len, sink, window, kv_valid)
    expected = oracle(q, k, v, mask, softcap=softcap, s_aux=s_aux)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)


def test_packed_segments_do_not_attend_across():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 60, 16)
    k, v = torch.randn(2, 1, 1, 60, 16)
    segments = torch.zeros(1, 60, dtype=torch.long)
    segments[:, 20:] = 1
    segments[:, 45:] = 2
    out = sink_window_attention(q, k, v, sink_tokens=2, window=6, segment_ids=segments, query_chunk=8, key_chunk=16)
    expected = oracle(q, k, v, explicit_mask(1, 60, 60, 2, 6, segment_ids=segments))
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)
    # The second segment alone gives the same rows: nothing leaks from the first.
    alone = sink_window_attention(q[:, :, 20:45], k[:, :, 20:45], v[:, :, 20:45], sink_tokens=2, window=6)
    torch.testing.assert_close(out[:, :, 20:45], alone, atol=2e-6, rtol=1e-5)


def test_fully_masked_rows_are_zero():
    q = torch.randn(1, 2, 10, 8)
    k, v = torch.randn(2, 1, 2, 10, 8)
    kv_valid = torch.ones(1, 10, dtype=torch.bool)
    kv_valid[0, :4] = False
    out = sink_window_attention(q, k, v, sink_tokens=1, window=3, kv_valid=kv_valid)
    assert torch.isfinite(out).all()
    assert out[:, :, :4].abs().max() == 0  # left-pad queries see no real key


def test_chunk_sizes_do_not_change_the_result():
    torch.manual_seed(0)
    q = torch.randn(1, 4, 300, 32)
    k, v = torch.randn(2, 1, 2, 300, 32)
    a = sink_window_attention(q, k, v, sink_tokens=4, window=50, query_chunk=7, key_chunk=13)
    b = sink_window_attention(q, k, v, sink_tokens=4, window=50, query_chunk=300, key_chunk=300)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gradients_match_the_oracle():
    torch.manual_seed(0)
    q = torch.randn(1, 4, 40, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 40, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 40, 16, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(1, 4, 40, 16, dtype=torch.float64)
    out = sink_window_attention(q, k, v, sink_tokens=2, window=7, query_chunk=8, key_chunk=16)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = oracle(q, k, v, explicit_mask(1, 40, 40, 2, 7))
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bfloat16_output_dtype_and_accuracy():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 64, 32, dtype=torch.bfloat16)
    k, v = torch.randn(2, 1, 1, 64, 32, dtype=torch.bfloat16)
    out = sink_window_attention(q, k, v, sink_tokens=4, window=16)
    assert out.dtype == torch.bfloat16
    expected = oracle(q, k, v, explicit_mask(1, 64, 64, 4, 16))
    assert (out.double() - expected).norm() / expected.norm() < 1e-2
