"""``longctx_s2``: shifted sparse attention for training (LongLoRA's S2-Attn, SinkLoRA's variant with sinks).

While the attention module trains (``module.training``), a sequence of S tokens is cut into groups of G tokens
(``ShiftedSparseAttention.group_size``, default S / 4) and each query attends causally within its group. The
first half of the query heads (with the first half of the key/value heads, so GQA pairs stay together) uses
groups [0, G), [G, 2G), ...; the second half uses groups shifted by G / 2: [0, G/2), [G/2, 3G/2), ...,
[S - G/2, S). LongLoRA rolls the shifted half by G / 2, so its last group wraps around and lets the first
tokens see the last ones; here the wrapped group is split in two instead, so no token sees a later one.
``s2_sink`` (SinkLoRA) also lets every query see the first ``sink_tokens`` tokens of the sequence.
Packed batches (``DataCollatorWithFlattening``: position ids that restart) train with ``s2``: the groups tile the
packed row and no query sees another document (the segment ids ride along as varlen); ``s2_sink`` refuses them,
since its sinks are the row's first tokens, not each document's.

Each group is one row of a batch of B * S / G rows (the shifted half padded by G / 2 tokens at both ends,
masked out through ``kv_valid``), so the whole thing is one call of ``longctx_sink``'s kernel dispatch: the
Triton kernel with its backward on CUDA, the PyTorch reference elsewhere. With sinks, each row's keys are the
sequence's sink keys followed by the group's keys (the queries are the last G of them); sinks that already lie
inside the group (or a later one) are masked out of the prefix.

In eval mode, and on layers with their own sliding window, the layer runs ``longctx_sink``'s attention with
``ShiftedSparseAttention.inference_attention`` (dense causal, or sinks + window).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from ..config import ShiftedSparseAttention, SinkAttention, parse_feature
from .sink import (
    autocast_inputs,
    check_call,
    module_inv_freq,
    packed_segments,
    sink_attention,
    sink_window_attention,
)

S2_ATTENTION_NAME = "longctx_s2"


def s2_parameters(config) -> ShiftedSparseAttention:
    """The ShiftedSparseAttention a model config asks for (its ``longctx`` key), ``"s2"`` defaults otherwise."""
    saved = (getattr(config, "longctx", None) or {}).get("attention")
    feature = parse_feature("attention", saved) if saved else None
    return feature if isinstance(feature, ShiftedSparseAttention) else ShiftedSparseAttention()


def group_size(feature: ShiftedSparseAttention, length: int) -> int:
    """Tokens per group for a ``length``-token training sequence; ValueError unless ``length`` is a multiple."""
    group = feature.group_size or length // 4
    if feature.group_size is None and (length % 8 or length < 8):
        raise ValueError(
            f"longctx_s2: with no `group_size`, groups are a quarter of the sequence and must be even, so the "
            f"training length must be a multiple of 8; got {length} tokens (pad batches, e.g. pad_to_multiple_of=8)"
        )
    if length % group:
        raise ValueError(
            f"longctx_s2: the training length ({length} tokens) must be a multiple of `group_size` ({group}); "
            f"pad batches to a multiple of it (e.g. pad_to_multiple_of={group})"
        )
    return group


def _grouped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid: torch.Tensor,
    *,
    group: int,
    shift: int,
    sink_tokens: int,
    segments: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """Causal attention within groups of ``group`` tokens starting at ``-shift``, plus the first ``sink_tokens``.

    Args:
        query: (B, H, S, D); key, value: (B, H_kv, S, D); valid: (B, S) bool, True for real tokens.
        shift: 0, or group // 2 for the shifted groups.
        segments: (B, S) int ids of packed documents (only with ``sink_tokens == 0``), or None.
        **kwargs: ``scale``, ``softcap``, ``s_aux`` for the kernel.
    Returns:
        (B, H, S, D) in ``query.dtype``.
    """
    batch, _, length, _ = query.shape
    if shift:
        query, key, value = (F.pad(x, (0, 0, shift, shift)) for x in (query, key, value))
        valid = F.pad(valid, (shift, shift), value=False)
        segments = None if segments is None else F.pad(segments, (shift, shift), value=-1)
    groups = valid.shape[1] // group

    def split(x: torch.Tensor) -> torch.Tensor:  # (B, h, n * G, D) -> (B * n, h, G, D)
        heads, dim = x.shape[1], x.shape[3]
        return x.reshape(batch, heads, groups, group, dim).transpose(1, 2).reshape(batch * groups, heads, group, dim)

    rows_valid = valid.reshape(batch * groups, group)
    keys, values = split(key), split(value)
    if sink_tokens:
        sinks = slice(shift, shift + min(sink_tokens, length))
        sink_index = torch.arange(sinks.start, sinks.stop, device=valid.device)
        # (n, k): group j's prefix holds the sinks of earlier groups (its own are in it, later ones are the future)
        earlier = sink_index // group < torch.arange(groups, device=valid.device)[:, None]
        prefix_valid = (valid[:, None, sinks] & earlier).reshape(batch * groups, -1)
        keys = torch.cat([key[:, :, sinks].repeat_interleave(groups, dim=0), keys], dim=2)
        values = torch.cat([value[:, :, sinks].repeat_interleave(groups, dim=0), values], dim=2)
        rows_valid = torch.cat([prefix_valid, rows_valid], dim=1)
    rows_segments = None if segments is None else segments.reshape(batch * groups, group)
    out = sink_window_attention(split(query), keys, values, sink_tokens=0, window=None, kv_valid=rows_valid,
                                segment_ids=rows_segments, **kwargs)
    heads, dim = out.shape[1], out.shape[3]
    out = out.reshape(batch, groups, heads, group, dim).transpose(1, 2).reshape(batch, heads, groups * group, dim)
    return out[:, :, shift : shift + length]


def shifted_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    feature: ShiftedSparseAttention,
    kv_valid: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """Shifted sparse attention over a full training sequence (see the module docstring).

    Args:
        query: (B, H, S, D) post-RoPE; key, value: (B, H_kv, S, D), H_kv even and dividing H.
        feature: group size and sinks.
        kv_valid: (B, S) bool padding mask, True for real tokens; None: all real.
        segment_ids: (B, S) int ids of packed documents (``s2`` only; ValueError with sinks), or None.
        s_aux: (H,) learned sink logits, split with the heads.
        **kwargs: ``scale``, ``softcap`` as in ``kernels.reference.sink_window_attention``.
    Returns:
        (B, H, S, D) in ``query.dtype``.
    """
    batch, heads, length, _ = query.shape
    kv_heads = key.shape[1]
    if kv_heads % 2:
        raise ValueError(
            f"longctx_s2: shifts half of the key/value heads, so num_key_value_heads must be even; got {kv_heads}"
        )
    group = group_size(feature, length)
    if segment_ids is not None and feature.sink_tokens:
        raise ValueError(
            f"longctx_s2: {feature.type!r} does not take packed sequences (position_ids that restart): its sinks are "
            "the row's first tokens; train packed batches with 's2', or unpacked ones with 's2_sink'"
        )
    valid = torch.ones(batch, length, dtype=torch.bool, device=query.device) if kv_valid is None else kv_valid.bool()
    halves = []
    for half, shift in ((0, 0), (1, group // 2)):
        q_heads = slice(half * heads // 2, (half + 1) * heads // 2)
        kv = slice(half * kv_heads // 2, (half + 1) * kv_heads // 2)
        halves.append(_grouped_attention(
            query[:, q_heads], key[:, kv], value[:, kv], valid, group=group, shift=shift,
            sink_tokens=feature.sink_tokens, segments=segment_ids, s_aux=None if s_aux is None else s_aux[q_heads],
            **kwargs,
        ))
    return torch.cat(halves, dim=1)


def s2_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention-registry entry point: shifted sparse attention in training, sink/dense attention otherwise.

    Args:
        query: (B, H, Sq, D); key, value: (B, H_kv, Skv, D), not repeated for GQA.
        attention_mask: None or (B, Skv) bool padding mask (from ``flash_attention_mask``).
        sliding_window: the layer's own window (local layers of hybrid models): kept as is, also in training.
    Returns:
        ((B, Sq, H, D) contiguous, None).
    """
    check_call(S2_ATTENTION_NAME, dropout, attention_mask)
    query, key, value = autocast_inputs(query, key, value)
    feature = s2_parameters(module.config)
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    segments = packed_segments(position_ids, batch, q_len, kv_len) if attention_mask is None else None
    if module.training and sliding_window is None:
        if q_len != kv_len:
            raise ValueError(f"longctx_s2 trains on whole sequences; got {q_len} queries for {kv_len} keys")
        out = shifted_sparse_attention(query, key, value, feature=feature, kv_valid=attention_mask,
                                       segment_ids=segments, s_aux=s_aux, scale=scaling, softcap=softcap)
    else:
        rule = feature.inference_attention(kv_len) if sliding_window is None else SinkAttention(0, sliding_window)
        out = sink_attention(query, key, value, feature=rule, inv_freq=lambda: module_inv_freq(module, query.device),
                             scale=scaling, softcap=softcap, s_aux=s_aux, kv_valid=attention_mask, segment_ids=segments)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``longctx_s2`` in both registries (idempotent)."""
    AttentionInterface.register(S2_ATTENTION_NAME, s2_attention_forward)
    AttentionMaskInterface.register(S2_ATTENTION_NAME, flash_attention_mask)
