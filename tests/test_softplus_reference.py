"""The softplus attention reference (kernels/reference_softplus.py) against a naive dense fp64 formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hf_longctx.kernels.reference_softplus import softplus_attention


def naive(q, k, v, reweight, power, valid_rows):
    """Dense fp64 LSSA / LSSAR written from the paper, one (batch, head) at a time.

    valid_rows: for each batch row, a list of (query index, list of visible key indices)."""
    B, H, Sq, D = q.shape
    groups = H // k.shape[1]
    out = torch.zeros(B, H, Sq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i, keys in valid_rows[b]:
                if not keys:
                    continue
                n = len(keys)
                qi = q[b, h, i].double()
                kj = k[b, h // groups, keys].double()
                cos = (kj @ qi) / (kj.norm(dim=-1) * qi.norm())
                a = F.softplus(math.log(D) * math.log(n) * cos)
                weights = a / a.sum()
                if reweight:
                    r = torch.relu(n * weights - (0.0 if n <= 3 else 1.0)) ** power
                    weights = r / r.sum() if r.sum() > 0 else torch.zeros_like(r)
                out[b, h, i] = weights @ v[b, h // groups, keys].double()
    return out


def causal_rows(batch, q_len, kv_len, valid=None, segments=None):
    rows = []
    for b in range(batch):
        row = []
        for i in range(q_len):
            absolute = kv_len - q_len + i
            keys = [j for j in range(absolute + 1)
                    if (valid is None or valid[b, j]) and (segments is None or segments[b, j] == segments[b, absolute])]
            row.append((i, keys))
        rows.append(row)
    return rows


def tensors(B, H, Hkv, Sq, Skv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Sq, D, generator=g, dtype=torch.float64),
            torch.randn(B, Hkv, Skv, D, generator=g, dtype=torch.float64),
            torch.randn(B, Hkv, Skv, D, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("reweight", [False, True])
@pytest.mark.parametrize("power", [1, 15])
def test_causal_gqa_matches_naive(reweight, power):
    q, k, v = tensors(2, 4, 2, 13, 13, 8)
    got = softplus_attention(q, k, v, reweight=reweight, power=power, query_chunk=5)
    expected = naive(q, k, v, reweight, power, causal_rows(2, 13, 13))
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("reweight", [False, True])
def test_query_offset_uses_absolute_counts(reweight):
    q, k, v = tensors(1, 2, 1, 3, 11, 8, seed=1)
    got = softplus_attention(q, k, v, reweight=reweight)
    torch.testing.assert_close(got, naive(q, k, v, reweight, 15, causal_rows(1, 3, 11)), atol=1e-10, rtol=1e-9)
    full = softplus_attention(torch.cat([tensors(1, 2, 1, 8, 11, 8, seed=2)[0], q], dim=2), k, v, reweight=reweight)
    torch.testing.assert_close(full[:, :, -3:], got, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("reweight", [False, True])
def test_padding_and_packed_segments(reweight):
    q, k, v = tensors(2, 2, 2, 12, 12, 8, seed=3)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[0, :4] = False  # left padding
    valid[1, 9:] = False  # right padding
    got = softplus_attention(q, k, v, reweight=reweight, kv_valid=valid)
    expected = naive(q, k, v, reweight, 15, causal_rows(2, 12, 12, valid=valid))
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-9)
    assert torch.equal(got[0, :, :4], torch.zeros_like(got[0, :, :4]))  # rows that see nothing: zeros

    segments = torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [1] * 3])
    got = softplus_attention(q, k, v, reweight=reweight, segment_ids=segments)
    expected = naive(q, k, v, reweight, 15, causal_rows(2, 12, 12, segments=segments))
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-9)


def test_uniform_and_zero_rows_are_finite():
    q = torch.zeros(1, 1, 9, 8, dtype=torch.float64)  # zero queries: every row is uniform
    k, v = torch.randn(1, 1, 9, 8, dtype=torch.float64), torch.randn(1, 1, 9, 8, dtype=torch.float64)
    lssa = softplus_attention(q, k, v, reweight=False)
    torch.testing.assert_close(lssa[0, 0, 5], v[0, 0, :6].mean(0))  # uniform weights: the mean value
    lssar = softplus_attention(q.requires_grad_(), k, v, reweight=True)
    assert torch.isfinite(lssar).all()
    assert torch.equal(lssar[0, 0, 3:], torch.zeros_like(lssar[0, 0, 3:]))  # no key above average: zeros
    lssar.sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("reweight", [False, True])
def test_gradcheck_fp64(reweight):
    q, k, v = (t.requires_grad_() for t in tensors(1, 2, 1, 6, 6, 4, seed=4))
    assert torch.autograd.gradcheck(lambda *x: softplus_attention(*x, reweight=reweight, power=3, query_chunk=4),
                                    (q, k, v))


def test_bad_input_raises():
    q, k, v = tensors(1, 3, 2, 4, 4, 8)
    with pytest.raises(ValueError, match="multiple"):
        softplus_attention(q, k, v)
    q, k, v = tensors(1, 2, 1, 4, 4, 8)
    with pytest.raises(ValueError, match="power"):
        softplus_attention(q, k, v, power=0)
