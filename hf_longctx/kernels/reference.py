"""Pure-PyTorch reference for sink/window attention: the test oracle and the CPU path.

The computation is chunked twice (queries, then keys with an online softmax), so memory stays at
O(query_chunk * key_chunk) per head and a 32K sequence runs on a CPU. Key blocks that no query of the
chunk can see are skipped, so the work is O(S * (sinks + window)) rather than O(S^2). All arithmetic
is float32; the result is cast back to the query's dtype. It is differentiable through autograd.

Visibility rule (shared with the Triton kernels in ``sink_window.py``):
- keys are indexed ``0 .. Skv-1``; query ``i`` is the key index ``Skv - Sq + i`` (queries are the
  last ``Sq`` positions: full prefill, chunked prefill and decode alike);
- the *logical index* ``L`` of a token is the number of valid (non-padding) tokens before it in
  its segment, so sinks are the first real tokens and distances count real tokens;
- key ``j`` is visible from query ``i`` iff it is valid, in the same segment, ``j <= i`` and
  ``L[j] < sink_tokens`` or ``L[i] - L[j] < window`` (``window=None``: plain causal attention).
A query that sees no key gets a zero output (never NaN).
"""

from __future__ import annotations

import torch


def attention_shapes(
    query: torch.Tensor, key: torch.Tensor, segment_ids: torch.Tensor | None = None
) -> tuple[int, int, int, int, int, int]:
    """(batch, heads, kv_heads, q_len, kv_len, head_dim) of query (B, H, Sq, D) and key (B, H_kv, Skv, D), after
    the checks every attention here shares: H a multiple of H_kv, Sq <= Skv, and Sq == Skv with packed segments."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    if q_len > kv_len:
        raise ValueError(f"query length ({q_len}) exceeds key length ({kv_len})")
    if segment_ids is not None and q_len != kv_len:
        raise ValueError("segment_ids (packed sequences) need query length == key length")
    return batch, heads, kv_heads, q_len, kv_len, head_dim


def normalised(acc: torch.Tensor, row_max: torch.Tensor, row_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The end of an online softmax: (acc / row_sum, natural-log LSE), with zeros and -inf for rows that saw no key.
    acc: (..., D) float32; row_max, row_sum: (...) float32."""
    denom = torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    return acc / denom[..., None], torch.where(row_sum > 0, row_max + denom.log(), float("-inf"))


def logical_positions(
    batch_size: int,
    kv_length: int,
    device: torch.device,
    kv_valid: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logical index of every key: valid tokens before it within its segment.

    Args:
        kv_valid: (B, Skv) bool, True for real tokens, or None (all real).
        segment_ids: (B, Skv) int, equal within one packed sequence, or None (one segment).
    Returns:
        (B, Skv) int64.
    """
    if kv_valid is None:
        counts = torch.ones(batch_size, kv_length, dtype=torch.long, device=device)
    else:
        counts = kv_valid.to(device=device, dtype=torch.long)
    before = torch.cumsum(counts, dim=-1) - counts
    if segment_ids is None:
        return before
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    # `before` is non-decreasing, so a running max of its value at each segment start gives the
    # count at the start of the segment every key belongs to.
    at_start = torch.where(starts, before, torch.zeros_like(before))
    return before - torch.cummax(at_start, dim=-1).values


def sink_window_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    sink_tokens: int,
    window: int | None,
    scale: float | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    kv_valid: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    query_chunk: int = 256,
    key_chunk: int = 1024,
    return_lse: bool = False,
    q_start: torch.Tensor | int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal attention restricted to ``sink_tokens`` first keys plus a recent ``window``.

    Args:
        query: (B, H, Sq, D); may be non-contiguous.
        key, value: (B, H_kv, Skv, D) with H a multiple of H_kv (grouped-query attention; the
            key/value heads are shared by broadcasting, never copied).
        sink_tokens: number of initial (logical) tokens every query sees; >= 0.
        window: number of most recent tokens a query sees, itself included; None for dense causal.
        scale: score multiplier, default D ** -0.5.
        softcap: if set, scores become ``softcap * tanh(scores / softcap)`` (Gemma 2).
        s_aux: (H,) learned sink logits: one extra logit per head in the softmax denominator.
        kv_valid: (B, Skv) bool padding mask, True for real tokens.
        segment_ids: (B, Skv) int ids of packed sequences; requires Sq == Skv.
        query_chunk, key_chunk: tile sizes (tokens); they bound memory, not the result.
        return_lse: also return the log-sum-exp of each row's scores (``s_aux`` included), to merge this
            attention with one over other keys.
        q_start: the slot of the first query (the queries are slots ``q_start`` .. ``q_start + Sq - 1``, keys past
            them are not attended); an int or a (1,) int64 tensor (read on the device: a static block of
            speculative decoding); None: the last Sq slots.
    Returns:
        (B, H, Sq, D) in ``query.dtype``; with ``return_lse``, also (B, H, Sq) float32 natural-log LSE,
        -inf for a row that sees no key.
    """
    batch, heads, kv_heads, q_len, kv_len, head_dim = attention_shapes(query, key, segment_ids)
    groups = heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    device = query.device

    positions = logical_positions(batch, kv_len, device, kv_valid, segment_ids)
    valid = (
        torch.ones(batch, kv_len, dtype=torch.bool, device=device)
        if kv_valid is None
        else kv_valid.to(device=device, dtype=torch.bool)
    )
    segments = segment_ids.to(device) if segment_ids is not None else None
    q_offset = kv_len - q_len if q_start is None else q_start
    on_device = isinstance(q_offset, torch.Tensor)  # then every key block is visited (no host read of the start)
    # Skipping invisible key blocks reads the positions on the host: not while a CUDA graph is being captured
    # (graph-decoded steps of float32 or soft-capped models run here), where it would break the capture.
    skip_blocks = window is not None and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())

    # (B, H_kv, G, Sq, D): the G query heads of one key/value head side by side.
    q_grouped = query.reshape(batch, kv_heads, groups, q_len, head_dim)
    if s_aux is not None:
        aux = s_aux.float().reshape(1, kv_heads, groups, 1)
    outputs, lses = [], []
    for first in range(0, q_len, query_chunk):
        q_stop = min(first + query_chunk, q_len)
        chunk = q_stop - first
        abs_q = q_offset + torch.arange(first, q_stop, device=device)
        q_pos = positions[:, abs_q]  # (B, chunk)
        q_blk = q_grouped[:, :, :, first:q_stop].float().reshape(batch, kv_heads, groups * chunk, head_dim)

        if s_aux is None:
            row_max = torch.full((batch, kv_heads, groups, chunk), float("-inf"), device=device)
            row_sum = torch.zeros(batch, kv_heads, groups, chunk, device=device)
        else:
            row_max = aux.expand(batch, kv_heads, groups, chunk).clone()
            row_sum = torch.ones(batch, kv_heads, groups, chunk, device=device)
        acc = torch.zeros(batch, kv_heads, groups, chunk, head_dim, device=device)

        last_key = kv_len if on_device else q_offset + q_stop  # causal: no query of the chunk sees keys past it
        for k_start in range(0, last_key, key_chunk):
            k_stop = min(k_start + key_chunk, last_key)
            k_pos = positions[:, k_start:k_stop]
            if skip_blocks and not _block_may_be_visible(q_pos, k_pos, sink_tokens, window):
                continue
            mask = valid[:, None, k_start:k_stop] & (
                torch.arange(k_start, k_stop, device=device)[None, None, :] <= abs_q[None, :, None]
            )
            if window is not None:
                distance = q_pos[:, :, None] - k_pos[:, None, :]
                mask = mask & ((k_pos[:, None, :] < sink_tokens) | (distance < window))
            if segments is not None:
                mask = mask & (segments[:, abs_q, None] == segments[:, None, k_start:k_stop])

            k_blk = key[:, :, k_start:k_stop].float()
            v_blk = value[:, :, k_start:k_stop].float()
            scores = torch.matmul(q_blk, k_blk.transpose(-1, -2)) * scale
            scores = scores.reshape(batch, kv_heads, groups, chunk, k_stop - k_start)
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            scores = scores.masked_fill(~mask[:, None, None], float("-inf"))

            new_max = torch.maximum(row_max, scores.amax(dim=-1))
            safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            probs = torch.exp(scores - safe_max[..., None])
            rescale = torch.exp(row_max - safe_max)
            row_sum = row_sum * rescale + probs.sum(dim=-1)
            pv = torch.matmul(
                probs.reshape(batch, kv_heads, groups * chunk, k_stop - k_start), v_blk
            ).reshape(batch, kv_heads, groups, chunk, head_dim)
            acc = acc * rescale[..., None] + pv
            row_max = new_max

        out_chunk, lse_chunk = normalised(acc, row_max, row_sum)
        outputs.append(out_chunk.reshape(batch, heads, chunk, head_dim))
        lses.append(lse_chunk.reshape(batch, heads, chunk))
    out = torch.cat(outputs, dim=2).to(query.dtype)
    return (out, torch.cat(lses, dim=2)) if return_lse else out


def _block_may_be_visible(
    q_pos: torch.Tensor, k_pos: torch.Tensor, sink_tokens: int, window: int
) -> bool:
    """Conservative test that some query of a chunk may see some key of a block.

    q_pos: (B, Cq) and k_pos: (B, Ck) logical indices. False only if no key is a sink and every key
    is at least ``window`` behind every query.
    """
    if bool((k_pos.amin() < sink_tokens).item()):
        return True
    return bool((k_pos.amax() > q_pos.amin() - window).item())
