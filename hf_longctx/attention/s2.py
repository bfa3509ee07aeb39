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

The groups are the Triton kernel's packed segments (``segment_ids``): the two head halves become the kernel's
batch of 2 (a view of q, k, v: the B rows of a half lie end to end), each half's groups its segments, so ONE call
of the kernel (forward and backward) runs on the original tensors and visits only the key blocks of a query's own
group. Without padding or packing on CUDA its segment table is a cached constant (no host sync); with them, or off
CUDA, the segment ids go through ``longctx_sink``'s dispatch (the PyTorch reference off CUDA). ``s2_sink``'s
sinks of earlier groups (each query sees at most ``sink_tokens`` of them) and learned sink logits (``s_aux``) are
extra logits of one float32 softmax with the group attention's LSE (which the kernel returns, gradients
included); a query's own-group sinks are among its group keys.

What this removed, per layer and training step (counted with a TorchDispatchMode on the CPU, kernel internals
not included): the previous formulation made each group a row of a padded batch, two kernel calls (one per
half), and issued 63 forward + 37 backward ops for ``s2_sink`` (43 + 17 for ``s2``) with 2 host syncs
(``kv_valid`` always given, so the masked span path and its hole check): F.pad of q, k, v, reshape-transpose
copies of q, k, v per half, the sink prefix by repeat_interleave + cat of k, v, the out reshape, torch.cat of the
halves and the caller's transpose copy (about 10 full-size copies forward, as many backward). Now: 23 + 27 ops
for ``s2_sink`` (3 + 2 for ``s2``), no host sync, one full-size output copy into (B, S, H, D), and for sinks a
float32 copy of q plus O(S * h * sink_tokens) score work.

In eval mode, and on layers with their own sliding window, the layer runs ``longctx_sink``'s attention with
``ShiftedSparseAttention.inference_attention`` (dense causal, or sinks + window).
"""

from __future__ import annotations

import functools

import torch
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


def _as_halves(x: torch.Tensor) -> torch.Tensor:
    """(B, n, S, D) -> (2, n / 2, B * S, D): the two head halves as the kernel's batch, the B rows end to end.

    A view when B == 1 or when x is laid out as (B, S, n, D) (transformers' q/k/v); a copy otherwise."""
    return x.unflatten(1, (2, -1)).permute(1, 2, 0, 3, 4).flatten(2, 3)


def _half_group_ids(length: int, group: int, device: torch.device) -> torch.Tensor:
    """(2, S) group index of every position: half 0's groups start at 0, half 1's at -group / 2."""
    index = torch.arange(length, device=device)
    return torch.stack([index // group, (index + group // 2) // group])


@functools.lru_cache(maxsize=64)
def _group_table(batch: int, length: int, group: int, device: torch.device) -> torch.Tensor:
    """The kernel's (n_seg, 5) int32 segment table (half, q_lo, q_hi, k_lo, k_hi) of every group of both halves
    along the B * S rows of :func:`_as_halves`; built once per shape (no host sync)."""
    rows = []
    for half, shift in ((0, 0), (1, group // 2)):
        bounds = [0, *range(group - shift, length, group), length]
        for start in range(0, batch * length, length):
            rows += [(half, start + lo, start + hi, start + lo, start + hi) for lo, hi in zip(bounds, bounds[1:])]
    return torch.tensor(rows, dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=64)
def _earlier_sinks(length: int, group: int, sinks: int, device: torch.device) -> torch.Tensor:
    """(2, 1, S, T) bool: whether key t < T lies in an earlier group than query s, per half. The sinks of a query's
    own group are among its group keys; those of later groups are in its future."""
    ids = _half_group_ids(length, group, device)
    return (ids[:, None, :sinks] < ids[:, :, None])[:, None]


def _grouped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    batch: int,
    group: int,
    kv_valid: torch.Tensor | None,
    segments: torch.Tensor | None,
    return_lse: bool,
    **kwargs,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal attention within the groups of each half (and within packed documents), both halves in one call.

    The groups are the kernel's packed segments, so it visits only the key blocks of a query's own group and
    reads q, k, v in place. Without padding or packing on CUDA, the segment table is a cached constant.

    Args:
        query: (2, h, B * S, D) from :func:`_as_halves`; key, value: (2, h_kv, B * S, D).
        kv_valid: (B, S) bool or None (all real); segments: (B, S) int ids of packed documents, or None.
        return_lse: also return the (2, h, B * S) float32 natural-log LSE of each row (-inf: no key seen).
        **kwargs: ``scale``, ``softcap`` for the kernel.
    Returns:
        (2, h, B * S, D) in ``query.dtype``, and the LSE with ``return_lse``.
    """
    length = query.shape[2] // batch
    if query.is_cuda and kv_valid is None and segments is None:
        from ..kernels import sink_window

        if sink_window.unsupported_reason(query, key, value, **kwargs) is None:
            table = _group_table(batch, length, group, query.device)
            return sink_window.sink_window_attention_segments(query, key, value, sink_tokens=0, window=None,
                                                              segments=table, return_lse=return_lse, **kwargs)
    ids = _half_group_ids(length, group, query.device)[:, None]  # (2, 1, S)
    if segments is not None:
        ids = ids + segments[None] * (length // group + 1)  # one id per (document, group) pair
    ids = ids.expand(2, batch, length)
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, :, 1:] = ids[:, :, 1:] != ids[:, :, :-1]
    ids = starts.flatten(1).cumsum(1)  # the segments of different batch rows get different ids
    valid = None if kv_valid is None else kv_valid.reshape(1, -1).expand(2, -1)
    return sink_window_attention(query, key, value, sink_tokens=0, window=None, kv_valid=valid, segment_ids=ids,
                                 return_lse=return_lse, **kwargs)


def _merge_extra_logits(
    out: torch.Tensor,
    lse: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    batch: int,
    sink_visible: torch.Tensor | None,
    s_aux: torch.Tensor | None,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """One softmax over a query's group keys (their attention ``out`` and ``lse``), the sinks of earlier groups and
    the learned sink logit ``s_aux`` (which has no value). Float32 throughout.

    Args:
        out: (2, h, B * S, D) group attention; lse: (2, h, B * S) its natural-log LSE (-inf: no key).
        query: (2, h, B * S, D); key, value: (2, h_kv, B * S, D), as from :func:`_as_halves`.
        sink_visible: (2, 1 or B, S, T) bool, the keys t < T of its row each query sees on top of its group;
            None: no sinks.
        s_aux: (2, h) learned sink logits, or None.
    Returns:
        (2, h, B * S, D) in ``query.dtype``.
    """
    _, heads, rows, dim = query.shape
    kv_heads, length = key.shape[1], rows // batch
    shape = (2, kv_heads, heads // kv_heads, batch, length)  # the kernel rows as (half, kv head, g, b, s)
    logits = [lse.clamp_min(-1e30).reshape(*shape, 1)]  # finite: a row that sees nothing keeps a zero output
    if s_aux is not None:
        logits.append(s_aux.float().reshape(2, kv_heads, -1, 1, 1, 1).expand(*shape, 1))
    if sink_visible is not None:
        sinks = sink_visible.shape[-1]
        # (2, h_kv, 1, B, T, D), broadcast over the g query heads of a KV head; q as one contiguous float32 copy
        keys, values = (x.unflatten(2, (batch, length))[:, :, None, :, :sinks].float() for x in (key, value))
        scale = dim**-0.5 if scale is None else scale
        grouped = query.to(torch.float32, memory_format=torch.contiguous_format).reshape(*shape, dim)
        scores = torch.matmul(grouped, keys.transpose(-1, -2) * scale)
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        logits.append(scores.masked_fill(~sink_visible[:, None, None], float("-inf")))
    weights = torch.softmax(torch.cat(logits, dim=-1), dim=-1)
    merged = out.reshape(*shape, dim) * weights[..., :1]
    if sink_visible is not None:
        merged = merged + torch.matmul(weights[..., -sinks:], values)
    return merged.to(query.dtype).reshape(2, heads, rows, dim)


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
        (B, H, S, D) in ``query.dtype``, laid out as (B, S, H, D) (``out.transpose(1, 2)`` is contiguous).
    """
    batch, heads, length, dim = query.shape
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
    kv_valid = None if kv_valid is None else kv_valid.bool()
    query, key, value = _as_halves(query), _as_halves(key), _as_halves(value)
    sinks = min(feature.sink_tokens, length)
    merge = bool(sinks) or s_aux is not None
    out = _grouped_attention(query, key, value, batch=batch, group=group, kv_valid=kv_valid, segments=segment_ids,
                             return_lse=merge, **kwargs)
    if merge:
        visible = None
        if sinks:
            visible = _earlier_sinks(length, group, sinks, query.device)
            if kv_valid is not None:
                visible = visible & kv_valid[None, :, None, :sinks]
        out = _merge_extra_logits(*out, query, key, value, batch=batch, sink_visible=visible,
                                  s_aux=None if s_aux is None else s_aux.reshape(2, -1), **kwargs)
    # (2, h, B * S, D) -> (B, S, H, D) memory, viewed as (B, H, S, D)
    out = out.unflatten(2, (batch, length)).permute(2, 3, 0, 1, 4).reshape(batch, length, heads, dim)
    return out.transpose(1, 2)


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
