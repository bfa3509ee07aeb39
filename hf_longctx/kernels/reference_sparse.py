"""Pure-PyTorch reference for block-sparse causal attention: the test oracle and the CPU path.

Which keys a query sees is given per (batch, query head, query block) in FlexAttention's ``BlockMask``
format, with blocks of ``block_size`` tokens along both the queries and the keys:

- ``kv_num_blocks`` (B, H, Qb) int and ``kv_indices`` (B, H, Qb, KVb) int: the first ``kv_num_blocks``
  entries of a row are key blocks computed *with* the causal mask (FlexAttention's partial blocks);
- ``full_kv_num_blocks`` / ``full_kv_indices`` (same shapes, optional): key blocks that every query row of
  the block sees entirely (FlexAttention's full blocks: the Triton kernel skips the mask there, so they must
  lie strictly below the diagonal);
- ``column_count`` (B, H, Qb) int and ``column_index`` (B, H, Qb, NC) int (optional): single key columns
  (MInference's "vertical" lines) seen by the query block, outside its listed blocks (each column once).

Key ``j`` is visible from query ``i`` (Sq == Skv: prefill) iff ``j <= i`` and ``j``'s block is listed for
``i``'s block, or ``j`` is one of its columns. ``Qb = ceil(S / block_size)``; the last blocks may be
partial (any length). A query that sees no key gets zeros (never NaN). GQA: ``H`` is a multiple of
``H_kv`` and key/value heads are shared by broadcasting, never copied.

The computation is chunked (a few query blocks at a time, keys in chunks with an online softmax, key chunks
that no query of the chunk selected are skipped), so a 32K sequence runs on a CPU. Float32 arithmetic,
differentiable through autograd; the result is cast back to the query's dtype.
"""

from __future__ import annotations

import torch

from .reference import normalised


def block_mask_from_lists(num: torch.Tensor, indices: torch.Tensor, kv_blocks: int) -> torch.Tensor:
    """(B, H, Qb, kv_blocks) bool: True where a block is among the first ``num`` entries of ``indices``.

    Args:
        num: (B, H, Qb) int, entries used per row; indices: (B, H, Qb, N) int key-block indices.
    """
    entries = torch.arange(indices.shape[-1], device=indices.device)
    used = entries < num[..., None].to(indices.device)
    mask = torch.zeros(*indices.shape[:-1], kv_blocks + 1, dtype=torch.bool, device=indices.device)
    slot = torch.where(used, indices.long().clamp(0, kv_blocks - 1), kv_blocks)  # unused entries: a spare slot
    mask.scatter_(-1, slot, True)
    return mask[..., :kv_blocks]


def lists_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., N) bool -> (num (...) int32, indices (..., N) int32): the True positions of each row in ascending
    order, first ``num`` entries used (the rest are 0). O(N) per row, no sort, no host sync."""
    n = mask.shape[-1]
    pos = torch.cumsum(mask.to(torch.int32), dim=-1) - 1
    num = (pos[..., -1] + 1).to(torch.int32) if n else mask.new_zeros(mask.shape[:-1], dtype=torch.int32)
    out = torch.zeros(*mask.shape[:-1], n + 1, dtype=torch.int32, device=mask.device)
    slot = torch.where(mask, pos.long(), n)
    values = torch.arange(n, dtype=torch.int32, device=mask.device).expand_as(mask)
    out.scatter_(-1, slot, values)
    return num, out[..., :n].contiguous()


def check_block_lists(name: str, num: torch.Tensor, indices: torch.Tensor, batch: int, heads: int,
                      q_blocks: int) -> None:
    """ValueError unless ``num`` is (B, H, Qb) and ``indices`` (B, H, Qb, N) with N >= 1 (H may be 1:
    broadcast over heads)."""
    if not isinstance(num, torch.Tensor) or not isinstance(indices, torch.Tensor):
        raise ValueError(f"{name}: counts and indices must be tensors")
    if num.dim() != 3 or indices.dim() != 4 or tuple(indices.shape[:3]) != tuple(num.shape):
        raise ValueError(f"{name}: counts must be (B, H, Qb) and indices (B, H, Qb, N); got "
                         f"{tuple(num.shape)} and {tuple(indices.shape)}")
    if num.shape[0] != batch or num.shape[1] not in (1, heads) or num.shape[2] != q_blocks:
        raise ValueError(f"{name}: counts of shape {tuple(num.shape)} do not match (B, H, Qb) = "
                         f"({batch}, {heads} or 1, {q_blocks})")
    if num.dtype.is_floating_point or indices.dtype.is_floating_point:
        raise ValueError(f"{name}: counts and indices must be integer tensors")


def selected_blocks(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, kv_blocks: int) -> torch.Tensor:
    """(B, H, Qb, KVb) bool: the union of the partial and full block lists."""
    mask = block_mask_from_lists(kv_num_blocks, kv_indices, kv_blocks)
    if full_kv_num_blocks is not None:
        mask = mask | block_mask_from_lists(full_kv_num_blocks, full_kv_indices, kv_blocks)
    return mask


def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    *,
    full_kv_num_blocks: torch.Tensor | None = None,
    full_kv_indices: torch.Tensor | None = None,
    column_count: torch.Tensor | None = None,
    column_index: torch.Tensor | None = None,
    block_size: int = 128,
    scale: float | None = None,
    query_chunk_blocks: int = 2,
    key_chunk: int = 2048,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse causal attention (see the module docstring for the visibility rule).

    Args:
        query: (B, H, S, D); key, value: (B, H_kv, S, D), H a multiple of H_kv.
        kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, column_count, column_index: the
            selection, shapes in the module docstring (head dimension H, or 1 to share it across heads).
        block_size: tokens per query block and per key block; >= 1.
        scale: score multiplier, default D ** -0.5.
        query_chunk_blocks, key_chunk: tile sizes (query blocks, keys); they bound memory, not the result.
        return_lse: also return the natural-log log-sum-exp of each row's scores.
    Returns:
        (B, H, S, D) in ``query.dtype``; with ``return_lse`` also (B, H, S) float32 (-inf: a row sees no key).
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    if q_len != kv_len:
        raise ValueError(f"block-sparse attention is for prefill: query length ({q_len}) must equal key length "
                         f"({kv_len})")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    n_blocks = -(-q_len // block_size)
    check_block_lists("kv_num_blocks/kv_indices", kv_num_blocks, kv_indices, batch, heads, n_blocks)
    if (full_kv_num_blocks is None) != (full_kv_indices is None):
        raise ValueError("full_kv_num_blocks and full_kv_indices go together")
    if full_kv_num_blocks is not None:
        check_block_lists("full_kv_num_blocks/full_kv_indices", full_kv_num_blocks, full_kv_indices, batch, heads,
                          n_blocks)
    if (column_count is None) != (column_index is None):
        raise ValueError("column_count and column_index go together")
    if column_count is not None:
        check_block_lists("column_count/column_index", column_count, column_index, batch, heads, n_blocks)
    groups = heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    device = query.device

    blocks = selected_blocks(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, n_blocks)
    blocks = blocks.expand(batch, heads, n_blocks, n_blocks).reshape(batch, kv_heads, groups, n_blocks, n_blocks)
    if column_count is not None:
        column_count = column_count.expand(batch, heads, n_blocks).reshape(batch, kv_heads, groups, n_blocks)
        column_index = column_index.expand(batch, heads, n_blocks, column_index.shape[-1]).reshape(
            batch, kv_heads, groups, n_blocks, -1)
    key_block = torch.arange(kv_len, device=device) // block_size
    q_grouped = query.reshape(batch, kv_heads, groups, q_len, head_dim)
    outputs, lses = [], []
    for qb0 in range(0, n_blocks, query_chunk_blocks):
        qb1 = min(qb0 + query_chunk_blocks, n_blocks)
        q_start, q_stop = qb0 * block_size, min(qb1 * block_size, q_len)
        chunk = q_stop - q_start
        rows = torch.arange(q_start, q_stop, device=device)
        row_block = rows // block_size - qb0
        # (B, Hkv, G, chunk, S) would be large: keep the per-q-block key masks (B, Hkv, G, nqb, S)
        key_mask = blocks[:, :, :, qb0:qb1][..., key_block]
        if column_count is not None:
            counts = column_count[:, :, :, qb0:qb1]
            cols = column_index[:, :, :, qb0:qb1].long()
            used = torch.arange(cols.shape[-1], device=device) < counts[..., None]
            spare = torch.zeros(*key_mask.shape[:-1], kv_len + 1, dtype=torch.bool, device=device)
            spare.scatter_(-1, torch.where(used, cols.clamp(0, kv_len - 1), kv_len), True)
            key_mask = key_mask | spare[..., :kv_len]
        q_blk = q_grouped[:, :, :, q_start:q_stop].float()
        row_max = torch.full((batch, kv_heads, groups, chunk), float("-inf"), device=device)
        row_sum = torch.zeros(batch, kv_heads, groups, chunk, device=device)
        acc = torch.zeros(batch, kv_heads, groups, chunk, head_dim, device=device)
        for k_start in range(0, q_stop, key_chunk):
            k_stop = min(k_start + key_chunk, q_stop)
            sub = key_mask[..., k_start:k_stop]
            if not bool(sub.any()):
                continue
            causal = torch.arange(k_start, k_stop, device=device)[None, :] <= rows[:, None]
            mask = sub[:, :, :, row_block] & causal  # (B, Hkv, G, chunk, keys)
            k_blk = key[:, :, None, k_start:k_stop].float()
            v_blk = value[:, :, None, k_start:k_stop].float()
            scores = torch.matmul(q_blk, k_blk.transpose(-1, -2)) * scale
            scores = scores.masked_fill(~mask, float("-inf"))
            new_max = torch.maximum(row_max, scores.amax(dim=-1))
            safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            probs = torch.exp(scores - safe_max[..., None])
            rescale = torch.exp(row_max - safe_max)
            row_sum = row_sum * rescale + probs.sum(dim=-1)
            acc = acc * rescale[..., None] + torch.matmul(probs, v_blk)
            row_max = new_max
        out_chunk, lse_chunk = normalised(acc, row_max, row_sum)
        outputs.append(out_chunk.reshape(batch, heads, chunk, head_dim))
        lses.append(lse_chunk.reshape(batch, heads, chunk))
    out = torch.cat(outputs, dim=2).to(query.dtype)
    return (out, torch.cat(lses, dim=2)) if return_lse else out
