"""Pure-PyTorch reference for position-remapped attention (Self-Extend, dual-chunk): oracle and CPU path.

Both schemes split the keys a query sees in two: *near* keys keep their true positions, *far* keys are
scored as if the query and key sat at other positions (``RemapScheme``), so no relative distance exceeds
what the model was trained on. A (query, key) pair is near or far, never both, so one softmax over the
row with the near score or the far score per key is exactly the log-sum-exp merge of two attentions over
the two disjoint key sets.

The inputs are post-RoPE: the model rotated query ``i`` and key ``j`` by their positions ``p_i``, ``p_j``
(rotate-half convention on the first ``2 * len(inv_freq)`` channels). A rotation composes, so rotating
them further by ``far(p) - p`` places them exactly at the far positions (``rerotate``): no pre-RoPE copy
is kept. Positions are logical (``reference.logical_positions``: real tokens before, per packed
sequence), which is what transformers' position ids are for left padding and packing.

Visibility is the causal rule of ``reference.py`` (queries are the last ``Sq`` keys; padding and
other packed sequences are invisible); a query that sees no key gets zeros. Chunked like ``reference.py``:
memory O(query_chunk * key_chunk) per head, all arithmetic float32, differentiable through autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import attention_shapes, logical_positions

SCHEMES = ("self_extend", "dual_chunk")


@dataclass(frozen=True)
class RemapScheme:
    """Which keys are near and where far pairs are placed. Positions are int64 tensors (tokens).

    ``self_extend``: near iff p_q - p_k < ``window``; far positions p_q // group + window - window // group
    for the query, p_k // group for the key (the two parts meet at distance ``window``).
    ``dual_chunk``: chunks of s = ``chunk_size - local_size`` tokens; near iff the key is in the query's
    chunk, or in the previous one while the query is among the first ``local_size`` of its chunk; far
    positions ``chunk_size - 1`` for the query and p_k mod s for the key.
    """

    kind: str
    window: int = 0
    group: int = 1
    chunk_size: int = 0
    local_size: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SCHEMES:
            raise ValueError(f"RemapScheme: unknown `kind` {self.kind!r}; accepted: {', '.join(SCHEMES)}")

    @property
    def chunk(self) -> int:
        """dual_chunk's chunk length s = chunk_size - local_size."""
        return self.chunk_size - self.local_size

    def near(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Bool, broadcast of q_pos and k_pos: True where the pair keeps its true positions."""
        if self.kind == "self_extend":
            return q_pos - k_pos < self.window
        q_chunk, k_chunk = q_pos // self.chunk, k_pos // self.chunk
        return (q_chunk == k_chunk) | ((q_chunk == k_chunk + 1) & (q_pos % self.chunk < self.local_size))

    def far_query(self, q_pos: torch.Tensor) -> torch.Tensor:
        if self.kind == "self_extend":
            return q_pos // self.group + self.window - self.window // self.group
        return torch.full_like(q_pos, self.chunk_size - 1)

    def far_key(self, k_pos: torch.Tensor) -> torch.Tensor:
        if self.kind == "self_extend":
            return k_pos // self.group
        return k_pos % self.chunk


def rerotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate post-RoPE vectors further by ``delta`` positions (rotate-half convention).

    Args:
        x: (B, H, S, D) float32; the first R = 2 * len(inv_freq) channels are rotary, the rest pass.
        delta: (B, S) position change per token (any integer or float dtype).
        inv_freq: (R / 2,) float32 radians per token, the model's own.
    Returns:
        (B, H, S, D) float32.
    """
    half = inv_freq.shape[0]
    angle = delta.float()[:, None, :, None] * inv_freq.float()  # (B, 1, S, R/2)
    cos, sin = angle.cos(), angle.sin()
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


def remap_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    inv_freq: torch.Tensor,
    scheme: RemapScheme,
    scale: float | None = None,
    softcap: float | None = None,
    kv_valid: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    query_chunk: int = 256,
    key_chunk: int = 1024,
) -> torch.Tensor:
    """Causal attention with near keys at true positions and far keys at ``scheme``'s positions.

    Args:
        query: (B, H, Sq, D) post-RoPE; may be non-contiguous.
        key, value: (B, H_kv, Skv, D), key post-RoPE; H a multiple of H_kv (shared, never copied).
        inv_freq: (R / 2,) the model's rotary frequencies (radians per token), R <= D.
        scheme: the near/far rule and far positions.
        scale: score multiplier, default D ** -0.5.
        softcap: if set, scores become ``softcap * tanh(scores / softcap)`` (Gemma 2).
        kv_valid: (B, Skv) bool padding mask, True for real tokens.
        segment_ids: (B, Skv) int ids of packed sequences; requires Sq == Skv.
        query_chunk, key_chunk: tile sizes (tokens); they bound memory, not the result.
    Returns:
        (B, H, Sq, D) in ``query.dtype``.
    """
    batch, heads, kv_heads, q_len, kv_len, head_dim = attention_shapes(query, key, segment_ids)
    if 2 * inv_freq.shape[0] > head_dim:
        raise ValueError(f"inv_freq has {inv_freq.shape[0]} frequencies, more than head_dim / 2 = {head_dim // 2}")
    groups = heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    device = query.device
    inv_freq = inv_freq.to(device=device, dtype=torch.float32)

    positions = logical_positions(batch, kv_len, device, kv_valid, segment_ids)
    valid = (
        torch.ones(batch, kv_len, dtype=torch.bool, device=device)
        if kv_valid is None
        else kv_valid.to(device=device, dtype=torch.bool)
    )
    segments = segment_ids.to(device) if segment_ids is not None else None
    q_offset = kv_len - q_len

    outputs = []
    for q_start in range(0, q_len, query_chunk):
        q_stop = min(q_start + query_chunk, q_len)
        chunk = q_stop - q_start
        abs_q = torch.arange(q_offset + q_start, q_offset + q_stop, device=device)
        q_pos = positions[:, abs_q]  # (B, chunk)
        q_near = query[:, :, q_start:q_stop].float()
        q_far = rerotate(q_near, scheme.far_query(q_pos) - q_pos, inv_freq)
        # (B, H_kv, G * chunk, D): the G query heads of one key/value head side by side.
        q_near = q_near.reshape(batch, kv_heads, groups * chunk, head_dim)
        q_far = q_far.reshape(batch, kv_heads, groups * chunk, head_dim)

        row_max = torch.full((batch, kv_heads, groups, chunk), float("-inf"), device=device)
        row_sum = torch.zeros(batch, kv_heads, groups, chunk, device=device)
        acc = torch.zeros(batch, kv_heads, groups, chunk, head_dim, device=device)
        for k_start in range(0, q_offset + q_stop, key_chunk):
            k_stop = min(k_start + key_chunk, q_offset + q_stop)
            width = k_stop - k_start
            k_pos = positions[:, k_start:k_stop]
            k_near = key[:, :, k_start:k_stop].float()
            k_far = rerotate(k_near, scheme.far_key(k_pos) - k_pos, inv_freq)
            v_blk = value[:, :, k_start:k_stop].float()

            near = scheme.near(q_pos[:, :, None], k_pos[:, None, :])  # (B, chunk, width)
            s_near = torch.matmul(q_near, k_near.transpose(-1, -2)).reshape(batch, kv_heads, groups, chunk, width)
            s_far = torch.matmul(q_far, k_far.transpose(-1, -2)).reshape(batch, kv_heads, groups, chunk, width)
            scores = torch.where(near[:, None, None], s_near, s_far) * scale
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            mask = valid[:, None, k_start:k_stop] & (
                torch.arange(k_start, k_stop, device=device)[None, None, :] <= abs_q[None, :, None]
            )
            if segments is not None:
                mask = mask & (segments[:, abs_q, None] == segments[:, None, k_start:k_stop])
            scores = scores.masked_fill(~mask[:, None, None], float("-inf"))

            new_max = torch.maximum(row_max, scores.amax(dim=-1))
            safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            probs = torch.exp(scores - safe_max[..., None])
            rescale = torch.exp(row_max - safe_max)
            row_sum = row_sum * rescale + probs.sum(dim=-1)
            pv = torch.matmul(probs.reshape(batch, kv_heads, groups * chunk, width), v_blk)
            acc = acc * rescale[..., None] + pv.reshape(batch, kv_heads, groups, chunk, head_dim)
            row_max = new_max

        denom = torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
        outputs.append((acc / denom[..., None]).reshape(batch, heads, chunk, head_dim))
    return torch.cat(outputs, dim=2).to(query.dtype)
