"""Block-sparse reference (kernels.reference_sparse) and the pattern estimators (hf_longctx.sparse) on tiny shapes."""

from __future__ import annotations

import math

import pytest
import torch

from hf_longctx.kernels import reference, reference_sparse as rs
from hf_longctx.sparse import block_topk_index, dense_index, last_query_attention, vertical_slash_index


def explicit_mask(S, bs, blocks, col_count=None, col_index=None):
    """(B, H, S, S) bool built from the definition: causal & (block listed | column listed)."""
    B, H = blocks.shape[:2]
    i = torch.arange(S)
    mask = blocks[:, :, i // bs][:, :, :, i // bs]
    if col_count is not None:
        for b in range(B):
            for h in range(H):
                for qb in range(blocks.shape[2]):
                    for c in col_index[b, h, qb, : col_count[b, h, qb]].tolist():
                        mask[b, h, qb * bs:(qb + 1) * bs, c] = True
    return mask & (i[None, :] <= i[:, None])


def masked_softmax_attention(q, k, v, mask):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1).double(), v.repeat_interleave(g, 1).double()
    s = (q.double() @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    return (p @ v).float()


def random_selection(B, H, S, bs, seed=0, columns=True):
    gen = torch.Generator().manual_seed(seed)
    n = -(-S // bs)
    ar = torch.arange(n)
    sel = (torch.rand(B, H, n, n, generator=gen) < 0.4) & (ar[None, :] < ar[:, None])
    full_num, full_idx = rs.lists_from_mask(sel)
    diag = (torch.rand(B, H, n, n, generator=gen) < 0.7) & (ar[None, :] == ar[:, None])
    num, idx = rs.lists_from_mask(diag)
    blocks = sel | diag
    cc = ci = None
    if columns:  # columns outside the listed blocks, before the query block
        key_blocks = torch.arange(S) // bs
        cand = (torch.rand(B, H, n, S, generator=gen) < 0.15) & ~blocks[..., key_blocks] & (
            key_blocks[None, :] < ar[:, None])
        cc, ci = rs.lists_from_mask(cand)
    return dict(kv_num_blocks=num, kv_indices=idx, full_kv_num_blocks=full_num, full_kv_indices=full_idx,
                column_count=cc, column_index=ci), blocks


@pytest.mark.parametrize("S,bs,H,Hkv", [(37, 8, 4, 2), (64, 16, 2, 2), (50, 16, 6, 3)])
def test_reference_matches_masked_softmax(S, bs, H, Hkv):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, H, S, 16), torch.randn(2, Hkv, S, 16), torch.randn(2, Hkv, S, 16)
    sel, blocks = random_selection(2, H, S, bs, seed=S)
    out, lse = rs.block_sparse_attention(q, k, v, sel.pop("kv_num_blocks"), sel.pop("kv_indices"), block_size=bs,
                                         query_chunk_blocks=2, key_chunk=24, return_lse=True, **sel)
    mask = explicit_mask(S, bs, blocks, sel["column_count"], sel["column_index"])
    torch.testing.assert_close(out, masked_softmax_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
    empty = ~mask.any(-1)
    assert torch.isneginf(lse[empty]).all() and torch.isfinite(lse[~empty]).all()
    assert (out[empty] == 0).all()


def test_all_blocks_equal_dense():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 45, 8), torch.randn(1, 2, 45, 8), torch.randn(1, 2, 45, 8)
    idx = dense_index(1, 4, 45, 8, "cpu")
    out = rs.block_sparse_attention(q, k, v, idx.kv_num_blocks, idx.kv_indices, **idx.kernel_kwargs())
    dense = reference.sink_window_attention(q, k, v, sink_tokens=0, window=None)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


def test_block_topk_density_one_selects_every_causal_block():
    q, k = torch.randn(1, 4, 70, 8), torch.randn(1, 2, 70, 8)
    idx = block_topk_index(q, k, block_size=16, density=1.0)
    assert torch.allclose(idx.block_density(), torch.ones(1, 4))
    assert (idx.kv_indices[..., 0] == torch.arange(5, dtype=torch.int32)).all()  # the diagonal is the masked one


def test_block_topk_picks_planted_block():
    """Query block 5 of head 1 matches key block 2 strongly; with low density it is picked, GQA-wise."""
    torch.manual_seed(2)
    S, bs = 96, 16
    q, k = torch.randn(1, 4, S, 16) * 0.1, torch.randn(1, 2, S, 16) * 0.1
    direction = torch.randn(16)
    q[0, 1, 5 * bs:6 * bs] += 4 * direction
    k[0, 0, 2 * bs:3 * bs] += 4 * direction  # head 1 reads key head 0 (G = 2)
    idx = block_topk_index(q, k, block_size=bs, density=0.5)  # 3 of 6 blocks: diagonal, block 0 and one
    mask = rs.block_mask_from_lists(idx.full_kv_num_blocks, idx.full_kv_indices, S // bs)
    assert mask[0, 1, 5, 2]
    assert not mask[0, 3, 5, 2] or bool(mask[0, 3, 5].sum() > 2)  # head 3 (key head 1) has no reason to
    assert bool(mask[0, :, :, 0][:, 1:].all())  # block 0 (sinks) always kept


def test_block_topk_mass_keeps_enough():
    torch.manual_seed(3)
    q, k = torch.randn(1, 2, 128, 16), torch.randn(1, 2, 128, 16)
    low = block_topk_index(q, k, block_size=16, mass=0.3).block_density()
    high = block_topk_index(q, k, block_size=16, mass=0.99).block_density()
    assert (high >= low).all() and (high > low).any()


def test_vertical_slash_picks_planted_column_and_diagonal():
    torch.manual_seed(4)
    S, bs, D = 256, 16, 16
    q, k = torch.randn(1, 2, S, D) * 0.05, torch.randn(1, 1, S, D) * 0.05
    u = torch.randn(D)
    u = u / u.norm()
    q[0, 0] += 6 * u  # every query of head 0 loves key 100 (a vertical line)
    k[0, 0, 100] += 6 * u
    # head 1: query i loves key i - 70 (a slash at distance 70), through rotating directions
    basis = torch.linalg.qr(torch.randn(D, D)).Q
    for i in range(70, S):
        q[0, 1, i] = 8 * basis[i % D]
        k[0, 0, i - 70] += 8 * basis[i % D]
    idx = vertical_slash_index(q, k, block_size=bs, last_q=32, density=0.1)
    qb = S // bs - 1
    cols = idx.column_index[0, 0, qb, : idx.column_count[0, 0, qb]].tolist()
    blocks = rs.selected_blocks(idx.kv_num_blocks, idx.kv_indices, idx.full_kv_num_blocks, idx.full_kv_indices,
                                S // bs)
    assert 100 in cols or blocks[0, 0, qb, 100 // bs]
    # distance 70 lies across block diagonals 4 and 5: query block 10 must see key blocks 5 or 6
    assert blocks[0, 1, 10, 5] or blocks[0, 1, 10, 6]
    assert blocks[0, :, torch.arange(S // bs), torch.arange(S // bs)].all()  # the local diagonal


def test_vertical_slash_output_is_kernel_input():
    torch.manual_seed(5)
    q, k, v = torch.randn(1, 4, 100, 16), torch.randn(1, 2, 100, 16), torch.randn(1, 2, 100, 16)
    idx = vertical_slash_index(q, k, block_size=16, last_q=8, density=0.3)
    out = rs.block_sparse_attention(q, k, v, idx.kv_num_blocks, idx.kv_indices, **idx.kernel_kwargs())
    blocks = rs.selected_blocks(idx.kv_num_blocks, idx.kv_indices, idx.full_kv_num_blocks, idx.full_kv_indices, 7)
    mask = explicit_mask(100, 16, blocks, idx.column_count, idx.column_index)
    torch.testing.assert_close(out, masked_softmax_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_bad_input():
    q, k = torch.randn(1, 4, 32, 8), torch.randn(1, 2, 32, 8)
    idx = dense_index(1, 4, 32, 8, "cpu")
    with pytest.raises(ValueError, match="block_size"):
        rs.block_sparse_attention(q, k, k, idx.kv_num_blocks, idx.kv_indices, block_size=0)
    with pytest.raises(ValueError, match="kv_num_blocks"):
        rs.block_sparse_attention(q, k, k, idx.kv_num_blocks[:, :, :2], idx.kv_indices, block_size=8)
    with pytest.raises(ValueError, match="query length"):
        rs.block_sparse_attention(q[:, :, :8], k, k, idx.kv_num_blocks, idx.kv_indices, block_size=8)
    with pytest.raises(ValueError, match="density"):
        block_topk_index(q, k, block_size=8, density=1.5)
    with pytest.raises(ValueError, match="last_q"):
        vertical_slash_index(q, k, block_size=8, last_q=0)


def pooled_scores(q, k, bs):
    """(B, H, Qb, Qb) float64 mean-block scores by the definition (GQA by repeating keys)."""
    n = -(-q.shape[2] // bs)
    pool = lambda x: torch.stack([x[:, :, i * bs:(i + 1) * bs].double().mean(2) for i in range(n)], 2)  # noqa: E731
    kp = pool(k).repeat_interleave(q.shape[1] // k.shape[1], 1)
    return pool(q) @ kp.transpose(-1, -2) * q.shape[-1] ** -0.5


def test_block_topk_density_matches_brute_force():
    """Each query block r keeps its diagonal, key block 0 and its ceil(density (r + 1)) best other causal blocks."""
    torch.manual_seed(6)
    S, bs, density = 150, 16, 0.3  # 10 blocks, the last partial
    q, k = torch.randn(2, 4, S, 8), torch.randn(2, 2, S, 8)
    idx = block_topk_index(q, k, block_size=bs, density=density)
    scores = pooled_scores(q, k, bs)
    n = scores.shape[-1]
    expected = torch.zeros(2, 4, n, n, dtype=torch.bool)
    for r in range(n):
        expected[..., r, r] = True
        expected[..., r, 0] = True
        if r > 1:
            best = scores[..., r, 1:r].topk(min(r - 1, math.ceil(density * (r + 1))), -1).indices + 1
            expected[..., r, :].scatter_(-1, best, True)
    got = rs.selected_blocks(idx.kv_num_blocks, idx.kv_indices, idx.full_kv_num_blocks, idx.full_kv_indices, n)
    assert torch.equal(got, expected)
    assert int(idx.full_kv_num_blocks.max()) <= idx.full_kv_indices.shape[-1]


@pytest.mark.parametrize("mass", [0.5, 0.9])
def test_block_topk_mass_is_the_fewest_reaching_it(mass):
    torch.manual_seed(7)
    S, bs = 160, 16
    q, k = torch.randn(1, 2, S, 8) * 2, torch.randn(1, 2, S, 8) * 2
    idx = block_topk_index(q, k, block_size=bs, mass=mass)
    n = S // bs
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    probs = torch.softmax(pooled_scores(q, k, bs).masked_fill(~causal, float("-inf")), -1)
    got = rs.selected_blocks(idx.kv_num_blocks, idx.kv_indices, idx.full_kv_num_blocks, idx.full_kv_indices, n)
    for h in range(2):
        for r in range(2, n):
            row, kept = probs[0, h, r], got[0, h, r]
            forced = torch.zeros(n, dtype=torch.bool)
            forced[[0, r]] = True
            assert kept[forced].all() and not kept[r + 1:].any()
            assert row[kept].sum() >= mass - 1e-6 or kept[: r + 1].all()
            others = kept & ~forced
            if others.any():  # without its weakest chosen block the row falls short: no block too many
                weakest = row.masked_fill(~others, float("inf")).argmin()
                assert row[kept].sum() - row[weakest] < mass + 1e-6


@pytest.mark.parametrize("S,bs,make", [(150, 16, "density"), (128, 32, "mass"), (45, 8, "dense"), (16, 16, "density")])
def test_flex_block_mask_equals_selection(S, bs, make):
    """index.block_mask(S) gives FlexAttention's BlockMask of exactly our blocks (its to_dense scatters each row
    into Qb columns: lists narrower than Qb with large indices were out of range, the first H100 run's assert)."""
    torch.manual_seed(8)
    q, k = torch.randn(1, 4, S, 8), torch.randn(1, 2, S, 8)
    if make == "dense":
        idx = dense_index(1, 4, S, bs, "cpu")
    else:
        idx = block_topk_index(q, k, block_size=bs, **({"density": 0.3} if make == "density" else {"mass": 0.8}))
    n = -(-S // bs)
    mask = idx.block_mask(S)
    ours = rs.selected_blocks(idx.kv_num_blocks, idx.kv_indices, idx.full_kv_num_blocks, idx.full_kv_indices, n)
    assert torch.equal(mask.to_dense().bool(), ours)
    assert mask.kv_indices.shape[-1] == n and mask.shape[-2:] == (S, S)
    full = rs.block_mask_from_lists(mask.full_kv_num_blocks, mask.full_kv_indices, n)
    assert not (full & ~torch.ones(n, n, dtype=torch.bool).tril(-1)).any()  # full blocks lie below the diagonal
    with pytest.raises(ValueError, match="seq_len"):
        idx.block_mask(S + bs)
    with pytest.raises(ValueError, match="BlockMask"):
        vertical_slash_index(q, k, block_size=bs, last_q=4, density=0.3).block_mask(S)


def test_last_query_attention_by_definition():
    """vertical[j] = sum over the last queries of p(i, j); slash[d] = sum over them of p(i, i - d); GQA heads."""
    torch.manual_seed(9)
    S, lq = 40, 6
    q, k = torch.randn(1, 6, S, 8), torch.randn(1, 2, S, 8)
    vertical, slash = last_query_attention(q, k, lq, heads_per_chunk=4)  # chunks straddle key/value heads
    kr = k.repeat_interleave(3, 1)
    i = torch.arange(S)
    full = torch.softmax((q @ kr.transpose(-1, -2) * 8**-0.5).masked_fill(i[None, :] > i[:, None], float("-inf")), -1)
    last = full[:, :, S - lq:]
    torch.testing.assert_close(vertical, last.sum(2), atol=1e-5, rtol=1e-5)
    expected = torch.zeros(1, 6, S)
    for r in range(lq):
        for d in range(S - lq + r + 1):
            expected[..., d] += last[..., r, S - lq + r - d]
    torch.testing.assert_close(slash, expected, atol=1e-5, rtol=1e-5)
