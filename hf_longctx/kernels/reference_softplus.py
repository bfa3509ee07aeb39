"""Pure-PyTorch reference for softplus attention (LSSA / LSSAR): the test oracle and the CPU path.

"Softplus Attention with Re-weighting Boosts Length Extrapolation in Large Language Models". Row ``i`` sees
``N_i`` keys (its visible keys: real tokens of its own sequence up to and including itself, counted in
*logical* positions as ``reference.logical_positions`` does, so padding and other packed sequences do not
count and a decode query at absolute position ``i`` has ``N_i = i`` 1-indexed).

- LSSA:  ``a_ij = softplus(log(D) * log(N_i) * <q_i/|q_i|, k_j/|k_j|>)`` for visible j,
  ``A_ij = a_ij / Z_i`` with ``Z_i = sum_j a_ij``; out = A V.
- LSSAR: ``R_ij = relu(N_i * A_ij - O_i) ** p`` with ``O_i = 0`` for ``N_i <= 3`` (the first three rows) and
  1 otherwise; ``W = R / sum_j R``; out = W V. ``R`` is computed as ``(relu(y) / max_j relu(y)) ** p`` (the
  same ratio; ``y ** 15`` overflows float32).

The logits ignore the model's ``scaling`` (no 1/sqrt(D)). A row that sees no key, and an LSSAR row where no
key is above the average (a uniform row: every ``N_i A_ij - O_i <= 0``), give zeros, never NaN.

All arithmetic is float32 (float64 stays float64, for gradcheck); the result has the query's dtype. Queries
are processed in chunks so memory is O(chunk * Skv) per head, never Skv x Skv; differentiable by autograd.
"""

from __future__ import annotations

import math

import torch

from .reference import attention_shapes, logical_positions

# Score elements (B x H x chunk x Skv) materialised at once: bounds the query chunk.
_CHUNK_ELEMENTS = 1 << 24
# |q| below this counts as a zero vector (its direction is then 0: every key scores softplus(0)).
NORM_EPS = 1e-6


def unit(x: torch.Tensor) -> torch.Tensor:
    """x / |x| over the last dim, computed in float32 (float64 kept), differentiable; zero vectors stay 0."""
    x = x if x.dtype == torch.float64 else x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def visible_counts(
    batch_size: int,
    q_len: int,
    kv_len: int,
    device: torch.device,
    kv_valid: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """N_i: the number of keys each query sees (real keys of its sequence up to and including itself).

    Returns (B, Sq) float32; queries are the last Sq of the Skv positions; 0 for a query that sees nothing
    (a left-padding slot).
    """
    positions = logical_positions(batch_size, kv_len, device, kv_valid, segment_ids)
    real = torch.ones_like(positions) if kv_valid is None else kv_valid.to(device=device, dtype=torch.long)
    return (positions + real)[:, kv_len - q_len:].float()


def row_scale(counts: torch.Tensor, head_dim: int) -> torch.Tensor:
    """log(D) * log(N_i): the logit multiplier of each query, (B, Sq) float32; 0 where N_i <= 1."""
    return math.log(head_dim) * counts.clamp_min(1).log()


def softplus_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    reweight: bool = True,
    power: int = 15,
    kv_valid: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    query_chunk: int | None = None,
) -> torch.Tensor:
    """Causal softplus attention, LSSA (``reweight=False``) or LSSAR (see the module docstring).

    Args:
        query: (B, H, Sq, D); the last Sq of the Skv positions (prefill, chunked prefill, decode).
        key, value: (B, H_kv, Skv, D) with H a multiple of H_kv (GQA by broadcasting, never copied).
        reweight: LSSAR (True) or LSSA (False).
        power: the re-weighting exponent p, an integer >= 1 (LSSAR only).
        kv_valid: (B, Skv) bool padding mask, True for real tokens.
        segment_ids: (B, Skv) int ids of packed sequences; requires Sq == Skv.
        query_chunk: queries per chunk (bounds memory, not the result); default from the sizes.
    Returns:
        (B, H, Sq, D) in ``query.dtype``.
    """
    batch, heads, kv_heads, q_len, kv_len, head_dim = attention_shapes(query, key, segment_ids)
    if isinstance(power, bool) or not isinstance(power, int) or power < 1:
        raise ValueError(f"power must be an integer >= 1, got {power!r}")
    groups = heads // kv_heads
    device = query.device
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    q_offset = kv_len - q_len

    counts = visible_counts(batch, q_len, kv_len, device, kv_valid, segment_ids).to(work)  # (B, Sq)
    scale = row_scale(counts, head_dim)
    offset = (counts > 3).to(work)  # O_i
    valid = None if kv_valid is None else kv_valid.to(device=device, dtype=torch.bool)
    segments = None if segment_ids is None else segment_ids.to(device)
    k_unit = unit(key).to(work)
    v_work = value.to(work)
    q_grouped = unit(query).to(work).reshape(batch, kv_heads, groups, q_len, head_dim)
    if query_chunk is None:
        query_chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * heads * kv_len))

    outputs = []
    for q_start in range(0, q_len, query_chunk):
        q_stop = min(q_start + query_chunk, q_len)
        chunk, last_key = q_stop - q_start, q_offset + q_stop
        abs_q = torch.arange(q_offset + q_start, last_key, device=device)
        mask = torch.arange(last_key, device=device)[None, None, :] <= abs_q[None, :, None]  # (1, chunk, keys)
        if valid is not None:
            mask = mask & valid[:, None, :last_key]
        if segments is not None:
            mask = mask & (segments[:, abs_q, None] == segments[:, None, :last_key])
        mask = mask[:, None, None]  # (B or 1, 1, 1, chunk, keys)
        cos = torch.matmul(q_grouped[:, :, :, q_start:q_stop], k_unit[:, :, None, :last_key].transpose(-1, -2))
        rows = scale[:, None, None, q_start:q_stop, None]
        a = torch.nn.functional.softplus(rows * cos).masked_fill(~mask, 0.0)
        weights = a / _safe(a.sum(dim=-1, keepdim=True))
        if reweight:
            n_i = counts[:, None, None, q_start:q_stop, None]
            excess = torch.relu(n_i * weights - offset[:, None, None, q_start:q_stop, None]).masked_fill(~mask, 0.0)
            peak = excess.detach().amax(dim=-1, keepdim=True)
            r = (excess / _safe(peak)) ** power
            weights = r / _safe(r.sum(dim=-1, keepdim=True))
        out = torch.matmul(weights, v_work[:, :, None, :last_key])  # (B, H_kv, G, chunk, D)
        outputs.append(out.reshape(batch, heads, chunk, head_dim))
    return torch.cat(outputs, dim=2).to(query.dtype)


def _safe(denominator: torch.Tensor) -> torch.Tensor:
    """The denominator with zeros replaced by 1 (an all-zero numerator then gives 0, not NaN)."""
    return torch.where(denominator > 0, denominator, torch.ones_like(denominator))
