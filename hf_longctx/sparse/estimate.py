"""Per-head sparse-pattern estimation on the device: the block-sparse kernel's inputs without an S x S matrix.

Both estimators take the post-RoPE ``query`` (B, H, S, D) and ``key`` (B, H_kv, S, D) of a prefill (GQA: the G
query heads of a key/value head read its keys by broadcasting) and return a :class:`SparseIndex` in the format of
``kernels.reference_sparse`` (blocks of ``block_size`` tokens along queries and keys, Qb = ceil(S / block_size)).
The diagonal block of every query block is always selected (the local diagonals), as is key block 0 (the first
columns, attention sinks).

- :func:`block_topk_index`: mean-pooled query and key blocks give a (Qb, Qb) block-score matrix per head (one
  reduction over q and k each, one matmul per key/value head); each query block keeps, beside the always-kept
  blocks, its best key blocks: a fraction ``density`` of its causal blocks (one top-k) or the fewest that bring
  the softmax mass, the always-kept blocks' included, to ``mass`` (one sort per row). Memory O(B H Qb^2), no
  host synchronisation; ``benchmarks/NOTES-sparse.md`` counts the work.
- :func:`vertical_slash_index`: the attention of the last ``last_q`` queries over all keys (in chunks of heads)
  scores every key column ("vertical") and every distance i - j ("slash"). Columns and distances are ranked
  together; kept beside the always-kept ones are the best ``density * S / 2`` of them (a column or a distance
  gives at most one key per query; an average causal query sees S / 2 keys), or the fewest whose mass reaches
  ``mass`` (of the last queries' total). Distances become block diagonals (a block (qb, kb) is kept when a kept distance crosses it);
  columns become per-query-block column lists (those outside the kept blocks and before the query block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels.reference_sparse import lists_from_mask

# Most columns a head keeps (the per-query-block column lists are B x H x Qb x this, int32).
MAX_COLUMNS = 4096
PATTERNS = ("vertical_slash", "block_topk")


@dataclass
class SparseIndex:
    """The selection the block-sparse kernel consumes (shapes in ``kernels.reference_sparse``); int32 tensors."""

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    full_kv_num_blocks: torch.Tensor
    full_kv_indices: torch.Tensor
    column_count: torch.Tensor | None
    column_index: torch.Tensor | None
    block_size: int

    def kernel_kwargs(self) -> dict:
        """Keyword arguments of ``block_sparse_attention`` (reference or Triton) after the two list tensors."""
        return dict(full_kv_num_blocks=self.full_kv_num_blocks, full_kv_indices=self.full_kv_indices,
                    column_count=self.column_count, column_index=self.column_index, block_size=self.block_size)

    def block_mask(self, seq_len: int):
        """The selection as FlexAttention's ``BlockMask`` (causal ``mask_mod`` on the partial blocks) for a
        prefill of ``seq_len`` tokens. ``from_kv_blocks`` expands each list into Qb columns, so the lists are
        given padded (or cut) to Qb entries per row (:func:`fit_lists`). Columns have no BlockMask form."""
        from torch.nn.attention.flex_attention import BlockMask

        if self.column_count is not None:
            raise ValueError("block_mask: a selection with key columns (vertical_slash) has no BlockMask form; "
                             "use a block_topk selection")
        qb = self.kv_num_blocks.shape[-1]
        if seq_len < 1 or -(-seq_len // self.block_size) != qb:
            raise ValueError(f"seq_len must give {qb} blocks of {self.block_size} tokens, got {seq_len!r}")

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        return BlockMask.from_kv_blocks(self.kv_num_blocks, fit_lists(self.kv_indices, qb).contiguous(),
                                        self.full_kv_num_blocks, fit_lists(self.full_kv_indices, qb).contiguous(),
                                        BLOCK_SIZE=self.block_size, mask_mod=causal, seq_lengths=(seq_len, seq_len))

    def block_density(self) -> torch.Tensor:
        """(B, H) fraction of the causal blocks computed (columns not counted)."""
        qb = self.kv_num_blocks.shape[-1]
        computed = (self.kv_num_blocks + self.full_kv_num_blocks).sum(-1).float()
        return computed / (qb * (qb + 1) / 2)


def _check(query: torch.Tensor, key: torch.Tensor, block_size: int, density, mass) -> None:
    if query.dim() != 4 or key.dim() != 4 or query.shape[0] != key.shape[0] or query.shape[3] != key.shape[3]:
        raise ValueError(f"query must be (B, H, S, D) and key (B, H_kv, S, D); got {tuple(query.shape)} and "
                         f"{tuple(key.shape)}")
    if query.shape[1] % key.shape[1] or query.shape[2] != key.shape[2]:
        raise ValueError(f"query heads must be a multiple of key heads and lengths equal; got {tuple(query.shape)} "
                         f"and {tuple(key.shape)}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    if density is not None and not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise ValueError(f"density must be None or a number in (0, 1], got {density!r}")
    if density is None and not (isinstance(mass, (int, float)) and 0 < mass <= 1):
        raise ValueError(f"mass must be a number in (0, 1], got {mass!r}")


def _diagonal_lists(batch: int, heads: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial (masked) block list: each query block's own diagonal block, (B, H, Qb) ones and (B, H, Qb, 1)."""
    num = torch.ones(batch, heads, n, dtype=torch.int32, device=device)
    return num, torch.arange(n, dtype=torch.int32, device=device)[:, None].expand(batch, heads, n, 1).contiguous()


def _split_lists(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, H, Qb, Qb) selected blocks -> (partial num, idx, full num, idx): the diagonal block is the partial
    (masked) one, blocks strictly below it are full; blocks above the diagonal are dropped."""
    B, H, qb = selected.shape[:3]
    ar = torch.arange(qb, device=selected.device)
    full_num, full_idx = lists_from_mask(selected & (ar[None, :] < ar[:, None]))
    return (*_diagonal_lists(B, H, qb, selected.device), full_num, full_idx)


def fit_lists(indices: torch.Tensor, width: int) -> torch.Tensor:
    """(B, H, Qb, N) block list -> (B, H, Qb, width): padded with block 0 (a valid index, unused) or cut; cutting
    is safe when no row uses more than ``width`` entries (a row lists at most Qb distinct blocks)."""
    if indices.shape[-1] >= width:
        return indices[..., :width]
    return F.pad(indices, (0, width - indices.shape[-1]))


def _keep_ranked(scores: torch.Tensor, budget: torch.Tensor | None, mass: float, total: torch.Tensor) -> torch.Tensor:
    """Bool mask of the same shape as ``scores`` (..., N): per row the +inf (always kept) entries plus the
    ``budget`` (...,) best others, or, with
    ``budget`` None, the fewest best whose sum reaches ``mass * total`` (...,). +inf scores are always kept."""
    order = scores.argsort(dim=-1, descending=True)
    ranked = scores.gather(-1, order)
    if budget is None:
        finite = torch.where(torch.isinf(ranked), torch.zeros_like(ranked), ranked)
        before = torch.cumsum(finite, -1) - finite  # mass of the better entries
        keep_sorted = before < mass * total[..., None]
    else:
        forced = torch.isposinf(ranked).sum(-1)
        keep_sorted = torch.arange(ranked.shape[-1], device=scores.device) < (budget + forced)[..., None]
    keep_sorted = keep_sorted | torch.isposinf(ranked)
    keep_sorted = keep_sorted & (ranked > float("-inf"))
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def _pool_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, h, S, D) -> (B, h, ceil(S / block_size), D) float32 block means (the last block over its real rows).

    One reduction over a view of ``x`` (no float copy, no padding copy: on CUDA a bf16/fp16 sum accumulates in
    float32 as it reads), plus one for a partial last block."""
    S = x.shape[2]
    full = S // block_size
    means = x[:, :, : full * block_size].unflatten(2, (full, block_size)).sum(3, dtype=torch.float32)
    means = means / block_size
    if S % block_size:
        means = torch.cat([means, x[:, :, full * block_size:].mean(2, keepdim=True, dtype=torch.float32)], 2)
    return means


def block_scores(query: torch.Tensor, key: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """(B, H, Qb, Qb) float32 scores of the mean query block against the mean key block, times ``scale``: one
    batched matmul per key/value head over its G query heads (GQA, keys never repeated). Not masked."""
    B, H, S, D = query.shape
    Hkv = key.shape[1]
    qp = _pool_blocks(query, block_size) * scale
    kp = _pool_blocks(key, block_size)
    n = qp.shape[2]
    return torch.matmul(qp.reshape(B, Hkv, (H // Hkv) * n, D), kp.transpose(-1, -2)).reshape(B, H, n, n)


def _with_sink_block(picked: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-block lists from ranked picks: ``picked`` (B, H, Qb, k) key blocks strictly between block 0 and the
    diagonal, best first, ``chosen`` (same shape) bool, a prefix of each row. Returns (num (B, H, Qb),
    indices (B, H, Qb, k + 1)) int32: key block 0 first (every query block after the first), then the chosen
    blocks best first; unused slots hold 0 (a valid block). No sort."""
    n = picked.shape[-2]
    after_first = (torch.arange(n, device=picked.device) > 0).to(torch.int32)
    num = chosen.sum(-1, dtype=torch.int32) + after_first
    indices = torch.cat([torch.zeros_like(picked[..., :1]), torch.where(chosen, picked, 0)], -1)
    return num, indices.to(torch.int32)


def block_topk_index(query: torch.Tensor, key: torch.Tensor, *, block_size: int = 128, density: float | None = None,
                     mass: float = 0.95, scale: float | None = None) -> SparseIndex:
    """Block top-k selection from pooled blocks (module docstring). Beside the diagonal block and key block 0,
    query block r keeps: with ``density`` in (0, 1], its ceil(density * (r + 1)) best key blocks (one top-k of
    width ceil(density * Qb) over the block scores, no softmax, no sort of the Qb x Qb matrix); with ``density``
    None, the fewest best blocks whose softmax mass, added to the always-kept blocks' mass, reaches ``mass`` in
    (0, 1] (one sort per row). No host synchronisation."""
    _check(query, key, block_size, density, mass)
    B, H, S, D = query.shape
    scores = block_scores(query, key, block_size, D**-0.5 if scale is None else scale)
    n = scores.shape[-1]
    ar = torch.arange(n, device=query.device)
    between = (ar[None, :] < ar[:, None]) & (ar[None, :] > 0)  # (Qb, Qb): the blocks that compete
    if density is not None:
        width = max(1, min(n, math.ceil(density * n)))
        values, picked = scores.masked_fill_(~between, float("-inf")).topk(width, dim=-1)
        budget = torch.ceil(density * (ar + 1).double()).clamp(min=1)  # (Qb,), as Python rounds it
        chosen = (torch.arange(width, device=query.device) < budget[:, None]) & (values > float("-inf"))
    else:
        probs = torch.softmax(scores.masked_fill(ar[None, :] > ar[:, None], float("-inf")), dim=-1)
        always = probs.diagonal(dim1=-2, dim2=-1) + torch.where(ar > 0, probs[..., 0], 0.0)  # (B, H, Qb)
        values, picked = probs.masked_fill(~between, -1.0).sort(dim=-1, descending=True)
        before = torch.cumsum(values.clamp(min=0), -1) - values.clamp(min=0)  # mass of the better blocks
        chosen = (always[..., None] + before < mass) & (values >= 0)
    full_num, full_idx = _with_sink_block(picked, chosen)
    num, idx = _diagonal_lists(B, H, n, query.device)
    return SparseIndex(num, idx, full_num, full_idx, None, None, block_size)


def last_query_probs(query: torch.Tensor, key: torch.Tensor, last_q: int, heads: slice,
                     scale: float | None = None) -> torch.Tensor:
    """(B, h, min(last_q, S), S) float32 causal softmax of the last queries of the query heads ``heads`` (a
    contiguous slice). One matmul per key/value head over the query heads that read it (keys never repeated)."""
    B, H, S, D = query.shape
    start, stop, step = heads.indices(H)
    if step != 1 or stop <= start:
        raise ValueError(f"heads must be a non-empty slice of step 1, got {heads!r}")
    G = H // key.shape[1]
    k0, k1 = start // G, -(-stop // G)  # the key/value heads the slice reads
    lq = min(last_q, S)
    scale = D**-0.5 if scale is None else scale
    q = query[:, k0 * G:k1 * G, S - lq:].float().reshape(B, k1 - k0, G * lq, D) * scale
    scores = torch.matmul(q, key[:, k0:k1].float().transpose(-1, -2)).reshape(B, (k1 - k0) * G, lq, S)
    scores = scores[:, start - k0 * G:stop - k0 * G]
    rows = torch.arange(S - lq, S, device=query.device)
    causal = torch.arange(S, device=query.device)[None, :] <= rows[:, None]
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)


def _per_distance(att: torch.Tensor) -> torch.Tensor:
    """(B, h, lq, S) attention of the last lq queries (row r is query S - lq + r) -> (B, h, S): summed per
    distance d = i - j. One shear (a strided view of the flipped, right-padded rows), one sum."""
    B, h, lq, S = att.shape
    width = S + lq
    padded = F.pad(att.flip(-1), (0, lq))  # row r, column c: key S - 1 - c (zeros past the first key)
    # element (r, d) at r * width + (lq - 1 - r + d): the key S - lq + r - d of row r
    sheared = padded.as_strided((B, h, lq, S), (h * lq * width, lq * width, width - 1, 1), lq - 1)
    return sheared.sum(2)


def last_query_attention(query: torch.Tensor, key: torch.Tensor, last_q: int, scale: float | None = None,
                         heads_per_chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and distance scores from the softmax attention of the last ``last_q`` queries.

    Returns ``vertical`` (B, H, S): attention summed over those queries per key; ``slash`` (B, H, S): summed per
    distance i - j. Each of the two sums to ``min(last_q, S)`` per head. Float32; O(B h last_q S) memory for
    chunks of ``heads_per_chunk`` heads; a fixed number of operations per chunk.
    """
    B, H, S, D = query.shape
    vertical, slash = [], []
    for h0 in range(0, H, heads_per_chunk):
        att = last_query_probs(query, key, last_q, slice(h0, min(h0 + heads_per_chunk, H)), scale)
        vertical.append(att.sum(2))
        slash.append(_per_distance(att))
    return torch.cat(vertical, 1), torch.cat(slash, 1)


def vertical_slash_index(query: torch.Tensor, key: torch.Tensor, *, block_size: int = 128, last_q: int = 64,
                         density: float | None = None, mass: float = 0.95, sink_tokens: int = 4,
                         scale: float | None = None) -> SparseIndex:
    """Vertical-slash selection from the last ``last_q`` queries (module docstring). The first ``sink_tokens``
    columns and the distances below ``block_size`` are always kept; at most ``MAX_COLUMNS`` columns per head."""
    _check(query, key, block_size, density, mass)
    if isinstance(last_q, bool) or not isinstance(last_q, int) or last_q < 1:
        raise ValueError(f"last_q must be an integer >= 1, got {last_q!r}")
    B, H, S, D = query.shape
    vertical, slash = last_query_attention(query, key, last_q, scale)
    vertical[..., :sink_tokens] = float("inf")
    slash[..., :block_size] = float("inf")
    pool = torch.cat([vertical, slash], dim=-1)
    budget = None if density is None else torch.full((B, H), max(1, math.ceil(density * S / 2)), device=query.device)
    keep = _keep_ranked(pool, budget, mass, torch.full((B, H), float(min(last_q, S)), device=query.device))
    keep_cols, keep_dist = keep[..., :S], keep[..., S:]

    n = -(-S // block_size)
    # distance d crosses block diagonal o = qb - kb iff |d - o * block_size| < block_size
    dist = F.pad(keep_dist.float(), (block_size - 1, (n + 1) * block_size - S))
    offsets = F.max_pool1d(dist.reshape(B * H, 1, -1), 2 * block_size - 1, stride=block_size)[..., :n]
    offsets = offsets.reshape(B, H, n) > 0
    ar = torch.arange(n, device=query.device)
    diff = (ar[:, None] - ar[None, :]).clamp(min=0)
    selected = offsets[..., diff] & (ar[None, :] <= ar[:, None])
    selected[..., 0] = True
    num, idx, full_num, full_idx = _split_lists(selected)

    col_num, col_idx = lists_from_mask(keep_cols)
    width = max(1, min(int(col_num.max()), MAX_COLUMNS))  # one host sync: the column list width
    cols = col_idx[..., :width].long()  # ascending; the best columns are not preferred by the cut (documented cap)
    used = torch.arange(width, device=query.device) < col_num[..., None]
    col_block = cols // block_size  # (B, H, width)
    in_block = selected.gather(-1, col_block[:, :, None, :].expand(B, H, n, width))
    visible = used[:, :, None, :] & (col_block[:, :, None, :] < ar[:, None]) & ~in_block
    count, pos = lists_from_mask(visible)
    column_index = cols[:, :, None, :].expand(B, H, n, width).gather(-1, pos.long()).to(torch.int32)
    return SparseIndex(num, idx, full_num, full_idx, count, column_index.contiguous(), block_size)


def dense_index(batch: int, heads: int, length: int, block_size: int, device) -> SparseIndex:
    """Every causal block selected (the sparse kernel then computes dense causal attention)."""
    n = -(-length // block_size)
    return SparseIndex(*_split_lists(torch.ones(batch, heads, n, n, dtype=torch.bool, device=device)), None, None,
                       block_size)
