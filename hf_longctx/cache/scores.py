"""Attention mass: how much attention each stored key receives from a set of queries.

This is the raw signal of the score-based eviction policies (SnapKV, H2O, TOVA, PyramidKV, KVCrush).
It is computed from what the attention function sees: post-RoPE queries and the stored keys, in the
cache's slot order, so no per-architecture code is needed. The softmax is computed in two passes over
key chunks (row max and normaliser, then probabilities), so memory stays at one chunk of scores per
query chunk, never (queries x stored keys) for the whole cache.
"""

from __future__ import annotations

import torch

# Score elements (batch x heads x queries x keys) materialised at once; bounds the chunk sizes.
_CHUNK_ELEMENTS = 1 << 24


def attention_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    scale: float | None,
    softcap: float | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of ``query`` over ``key``, summed over the queries.

    Args:
        query: (B, H, Q, D) post-RoPE queries; query ``i`` sits at stored slot ``S - Q + i`` (the queries
            are the latest tokens) and sees the keys of slots ``0 .. S - Q + i`` (causal).
        key: (B, H_kv, S, D) stored keys, H a multiple of H_kv (grouped-query attention).
        scale: score multiplier, default D ** -0.5.
        softcap: if set, scores become ``softcap * tanh(scores / softcap)`` as in the model.
        valid: (B, S) bool, True where a slot holds a real token. Padding keys receive no attention
            and queries at padding slots contribute nothing. None: all real.
    Returns:
        (B, H_kv, S) float32: for each key, its attention probability summed over the queries and
        averaged over the query heads that share its key/value head.
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    device = query.device
    if valid is None:
        valid = torch.ones(batch, kv_len, dtype=torch.bool, device=device)
    q_offset = kv_len - q_len
    query_chunk = max(1, min(q_len, _CHUNK_ELEMENTS // max(1, batch * heads * kv_len)))
    key_chunk = max(1, min(kv_len, _CHUNK_ELEMENTS // max(1, batch * heads * query_chunk)))
    q_grouped = query.reshape(batch, kv_heads, groups, q_len, head_dim)
    mass = torch.zeros(batch, kv_heads, kv_len, dtype=torch.float32, device=device)

    for q_start in range(0, q_len, query_chunk):
        q_stop = min(q_start + query_chunk, q_len)
        chunk = q_stop - q_start
        slots = torch.arange(q_offset + q_start, q_offset + q_stop, device=device)
        q_blk = q_grouped[:, :, :, q_start:q_stop].float().reshape(batch, kv_heads, groups * chunk, head_dim)
        last_key = q_offset + q_stop

        def masked_scores(k_start: int, k_stop: int) -> torch.Tensor:
            """(B, H_kv, G, chunk, k_stop - k_start) scores, -inf where not visible."""
            scores = torch.matmul(q_blk, key[:, :, k_start:k_stop].float().transpose(-1, -2)) * scale
            scores = scores.reshape(batch, kv_heads, groups, chunk, k_stop - k_start)
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            visible = valid[:, None, k_start:k_stop] & (
                torch.arange(k_start, k_stop, device=device)[None, None, :] <= slots[None, :, None]
            )
            return scores.masked_fill(~visible[:, None, None], float("-inf"))

        row_max = torch.full((batch, kv_heads, groups, chunk), float("-inf"), device=device)
        row_sum = torch.zeros(batch, kv_heads, groups, chunk, device=device)
        for k_start in range(0, last_key, key_chunk):
            scores = masked_scores(k_start, min(k_start + key_chunk, last_key))
            new_max = torch.maximum(row_max, scores.amax(dim=-1))
            safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            row_sum = row_sum * torch.exp(row_max - safe_max) + torch.exp(scores - safe_max[..., None]).sum(-1)
            row_max = new_max
        safe_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
        # Queries at padding slots (and queries that see no key) get weight 0.
        weight = torch.where(row_sum > 0, 1.0 / row_sum.clamp_min(1e-30), torch.zeros_like(row_sum))
        weight = weight * valid[:, slots].to(weight.dtype)[:, None, None, :]
        for k_start in range(0, last_key, key_chunk):
            k_stop = min(k_start + key_chunk, last_key)
            probs = torch.exp(masked_scores(k_start, k_stop) - safe_max[..., None]) * weight[..., None]
            mass[:, :, k_start:k_stop] += probs.sum(dim=(2, 3)) / groups
    return mass


def pool_along_keys(scores: torch.Tensor, kernel: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Average (B, H_kv, S) scores over each slot's ``kernel`` (odd) neighbouring real slots.

    Neighbours of an important token are kept with it (SnapKV's clustering). Padding slots
    (``valid`` (B, S) False) are not neighbours, so a left-padded row pools as it does unpadded.
    """
    if kernel == 1:
        return scores
    batch, kv_heads, kv_len = scores.shape
    weight = torch.ones(batch, kv_len, device=scores.device) if valid is None else valid.float()
    weight = weight[:, None].expand(batch, kv_heads, kv_len).reshape(batch * kv_heads, 1, kv_len)

    def window_sum(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool1d(tensor, kernel, stride=1, padding=kernel // 2) * kernel

    total = window_sum(scores.reshape(batch * kv_heads, 1, kv_len) * weight)
    return (total / window_sum(weight).clamp_min(1)).reshape(batch, kv_heads, kv_len)
