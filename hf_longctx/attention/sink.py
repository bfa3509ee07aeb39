"""``longctx_sink``: sink/window attention behind transformers' attention registry.

Models call ``fn(module, query, key, value, attention_mask, dropout=..., scaling=..., **kwargs)``
(see ``transformers.integrations.sdpa_attention``) and expect ``(out[B, Sq, H, D], None)``. The
mask registry entry is transformers' ``flash_attention_mask``: ``attention_mask`` arrives as None or
the 2D (B, Skv) padding mask, never as a 4D tensor (which would be O(S^2) memory).

Parameters come from ``module.config.longctx["attention"]`` (written by ``patch``); a model loaded
with ``attn_implementation="longctx_sink"`` and no such key uses ``SinkAttention()``'s defaults.

Positions (``SinkAttention.positions`` / ``distance_limit``). Keys inside a query's window keep their true
distances; only a sink beyond the window may be seen closer than it is: at min(i - t, distance_limit)
(LM-Infinite) or at min(i, sink_tokens + window - 1) - t (positions inside a sinks + window cache,
StreamingLLM). The keys are cached after RoPE at their true positions and stay so; rotations compose, so
the attention moves each such sink key forward by the difference (``rerotate``), in float32, per query:
exact, and a 100K-token stream never re-rounds a stored key. The attention is then two softmaxes over
disjoint key sets merged by their log-sum-exp: the window (the Triton kernel or the reference, with
``sink_tokens=0``) and the sinks beyond it (a small dense part here, ``sink_tokens`` keys per query). When
no sink can be moved (a sequence within reach of the cap, or no sinks), it is the single kernel call.

Under KV eviction (``attention/kv.py``) a query's true position is its index among the stored real tokens
plus the real tokens its row evicted (``position_offset``); the sinks are the first real tokens, so they
stay at positions 0 .. sink_tokens - 1 as long as the cache keeps them (``config.kv_for_attention``).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from ..config import SinkAttention, parse_feature
from ..kernels import reference
from ..kernels.reference_remap import rerotate

ATTENTION_NAME = "longctx_sink"
_warned_fallbacks: set[str] = set()
# Elements of gathered sink keys (B x H_kv x queries x sinks x D) materialised at once: bounds the query chunk.
_SINK_CHUNK_ELEMENTS = 1 << 24
# Rotary frequencies per attention module: (rope parameters they were computed from, device, inv_freq).
_inv_freq_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def sink_parameters(config) -> SinkAttention:
    """The SinkAttention a model config asks for (its ``longctx`` key), defaults otherwise."""
    saved = (getattr(config, "longctx", None) or {}).get("attention")
    feature = parse_feature("attention", saved) if saved else None
    return feature if isinstance(feature, SinkAttention) else SinkAttention()


def module_inv_freq(module: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """(R / 2,) float32 rotary frequencies of the model an attention module belongs to, cached per module
    (recomputed when its config's ``rope_parameters`` change, e.g. by a rope feature)."""
    from .remap import rotary_frequencies  # remap imports this module

    key = (repr(module.config.rope_parameters), device)
    cached = _inv_freq_cache.get(module)
    if cached is None or cached[0] != key:
        cached = (key, rotary_frequencies(module.config, device))
        _inv_freq_cache[module] = cached
    return cached[1]


def check_call(name: str, dropout: float, attention_mask: torch.Tensor | None) -> None:
    """Refuse what no longctx attention function implements: attention dropout, and any mask other than
    None or the 2D (batch, kv_length) padding mask that ``flash_attention_mask`` hands over."""
    if dropout:
        raise ValueError(f"{name} does not implement attention dropout; got dropout={dropout}")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"{name} takes a 2D (batch, kv_length) padding mask, got attention_mask of shape "
            f"{tuple(attention_mask.shape)}"
        )


def autocast_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """The three inputs in the dtype autocast computes attention in (as SDPA does under autocast), else unchanged.

    Under bf16/fp16 autocast with float32 weights, RoPE returns float32 q and k while v comes out of a linear
    layer in the autocast dtype; the kernels take one 16-bit dtype.
    """
    device_type = query.device.type
    if not torch.is_autocast_enabled(device_type):
        return query, key, value
    dtype = torch.get_autocast_dtype(device_type)
    return query.to(dtype), key.to(dtype), value.to(dtype)


def packed_segments(
    position_ids: torch.Tensor | None, batch_size: int, q_len: int, kv_len: int
) -> torch.Tensor | None:
    """Segment ids (B, S) of packed sequences, from position_ids that restart, else None.

    Packing is recognised as transformers' flash path does: no padding mask, a full sequence
    (Sq == Skv) and position ids that do not simply count up by one.
    """
    if position_ids is None or q_len != kv_len or position_ids.shape[-1] != kv_len:
        return None
    position_ids = position_ids.expand(batch_size, kv_len)
    breaks = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not bool(breaks.any()):
        return None
    return torch.cat([torch.zeros_like(breaks[:, :1]), breaks], dim=1).long().cumsum(dim=1)


def sink_window_attention(
    query, key, value, *, kv_spans: torch.Tensor | None = None, **kwargs
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dispatch: CUDA tensors to the Triton kernel, others to the PyTorch reference.

    Shapes and keywords as ``kernels.reference.sink_window_attention`` (``return_lse`` included); returns
    (B, H, Sq, D), or with ``return_lse`` also the (B, H, Sq) float32 LSE. CUDA inputs the kernel cannot take
    (float32, an unsupported head_dim, ...) run on the reference, with a warning once per reason.
    ``kv_spans``: optional (B, 2) int32 [start, end) of each row's real keys, the same keys as ``kv_valid``
    (which must be given too): the kernel then takes them as they are, with no host sync (CUDA-graph steps).
    """
    if query.is_cuda:
        try:
            from ..kernels import sink_window
        except ImportError as exc:  # triton missing or broken on this machine
            reason = f"the Triton kernel cannot be imported ({exc})"
        else:
            checked = {name: value for name, value in kwargs.items() if name not in ("return_lse", "q_start")}
            reason = sink_window.unsupported_reason(query, key, value, **checked)
            if reason is None and kv_spans is not None:
                kernel_kwargs = {name: value for name, value in kwargs.items() if name != "kv_valid"}
                return sink_window.sink_window_attention_segments(query, key, value, kv_spans=kv_spans,
                                                                  **kernel_kwargs)
            if reason is None:
                return sink_window.sink_window_attention_triton(query, key, value, **kwargs)
        if reason not in _warned_fallbacks:
            _warned_fallbacks.add(reason)
            warnings.warn(f"longctx_sink: {reason}; using the slow PyTorch reference on CUDA", stacklevel=3)
    return reference.sink_window_attention(query, key, value, **kwargs)


def _sinks_move(feature: SinkAttention, kv_len: int, position_offset: torch.Tensor | None) -> bool:
    """Whether some sink may be seen closer than its true distance (else one kernel call is exact).

    Decided from shapes, without a device sync: with no eviction (``position_offset`` None) the largest
    distance is ``kv_len - 1``, and a sink moves only past the cap (``distance_limit``, or
    ``sink_tokens + window - 1`` minus the sink for positions="cache").
    """
    if feature.sink_tokens == 0 or kv_len <= feature.window:
        return False  # no sink, or none beyond the window
    if feature.positions == "cache":
        return position_offset is not None or kv_len > feature.sink_tokens + feature.window
    if feature.distance_limit is None:
        return False
    return position_offset is not None or kv_len - 1 > feature.distance_limit


def sink_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    feature: SinkAttention,
    inv_freq: torch.Tensor | Callable[[], torch.Tensor],
    position_offset: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """Sink/window attention with the position rule of ``feature`` (see the module docstring).

    Args:
        query: (B, H, Sq, D) post-RoPE, the last Sq of the Skv tokens; key, value: (B, H_kv, Skv, D), key post-RoPE.
        feature: sinks, window and positions.
        inv_freq: (R / 2,) the model's rotary frequencies (radians per token), or a callable returning them
            (called only when a sink has to move).
        position_offset: (B,) int64 tokens each row evicted: a token's true position is its logical index
            among the stored tokens plus this (the sinks excepted); None when nothing was evicted.
        **kwargs: ``scale``, ``softcap``, ``s_aux``, ``kv_valid``, ``segment_ids`` as in
            ``kernels.reference.sink_window_attention``, and ``kv_spans`` as in ``sink_window_attention``.
    Returns:
        (B, H, Sq, D) in ``query.dtype``.
    """
    kv_len = key.shape[2]
    window = None if feature.window >= kv_len else feature.window
    if not _sinks_move(feature, kv_len, position_offset):
        return sink_window_attention(query, key, value, sink_tokens=feature.sink_tokens, window=window, **kwargs)
    window_out, window_lse = sink_window_attention(query, key, value, sink_tokens=0, window=window,
                                                   return_lse=True, **kwargs)
    sink_max, sink_sum, sink_acc = _moved_sinks_softmax(
        query, key, value, feature=feature, inv_freq=inv_freq() if callable(inv_freq) else inv_freq,
        position_offset=position_offset, scale=kwargs.get("scale"), softcap=kwargs.get("softcap"),
        kv_valid=kwargs.get("kv_valid"), segment_ids=kwargs.get("segment_ids"),
    )
    # One softmax over the two disjoint key sets; the shift is only for range (the result does not depend on it).
    shift = torch.maximum(window_lse.detach(), sink_max)
    shift = torch.where(torch.isinf(shift), torch.zeros_like(shift), shift)
    window_weight = torch.exp(window_lse - shift)
    sink_weight = torch.exp(sink_max - shift)
    numerator = window_out.float() * window_weight[..., None] + sink_acc * sink_weight[..., None]
    denominator = window_weight + sink_sum * sink_weight
    denominator = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return (numerator / denominator[..., None]).to(query.dtype)


class _GatherFloat(torch.autograd.Function):
    """``source.gather(2, index).float()`` whose backward sums the gradient in float32.

    Every query of a sequence gathers the same few sink slots, so a slot's gradient is a sum over thousands of
    queries: autograd's own backward would accumulate it in the source dtype (bf16 on CUDA) and lose about 3%.
    source: (B, H_kv, S, D); index: (B, H_kv, N, D) slot indices. Returns (B, H_kv, N, D) float32.
    """

    @staticmethod
    def forward(ctx, source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.source_shape, ctx.source_dtype = source.shape, source.dtype
        return source.gather(2, index).float()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        total = grad.new_zeros(ctx.source_shape, dtype=torch.float32).scatter_add_(2, index, grad.float())
        return total.to(ctx.source_dtype), None


def _moved_sinks_softmax(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    feature: SinkAttention,
    inv_freq: torch.Tensor,
    position_offset: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    kv_valid: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unnormalised softmax of each query over its sinks beyond its window, at the feature's distances.

    Sink t of a query's sequence (its t-th real token) is beyond the window when L_q - t >= window (L: logical
    positions, ``reference.logical_positions``). Seen from the query's true position p = L_q + offset, its
    key is moved forward by max(0, p - t - cap_t) positions, cap_t = ``distance_limit`` or, for
    positions="cache", ``sink_tokens + window - 1 - t``. Float32 throughout, differentiable.

    Returns:
        row_max (B, H, Sq) detached (-inf where no sink is beyond the window), row_sum (B, H, Sq) =
        sum exp(s - row_max), acc (B, H, Sq, D_v) = sum exp(s - row_max) v.
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len, value_dim = key.shape[1], key.shape[2], value.shape[3]
    groups, sinks = heads // kv_heads, feature.sink_tokens
    if 2 * inv_freq.shape[0] > head_dim:
        raise ValueError(f"inv_freq has {inv_freq.shape[0]} frequencies, more than head_dim / 2 = {head_dim // 2}")
    scale = head_dim**-0.5 if scale is None else scale
    device = query.device
    inv_freq = inv_freq.to(device=device, dtype=torch.float32)

    positions = reference.logical_positions(batch, kv_len, device, kv_valid, segment_ids)
    real = torch.ones(batch, kv_len, dtype=torch.long, device=device) if kv_valid is None else kv_valid.long()
    seen = real.cumsum(-1)  # real tokens up to and including each slot
    q_pos = positions[:, kv_len - q_len :]  # (B, Sq)
    # Real tokens of the row before the query's sequence; sink t is the (start + t + 1)-th real token of the row.
    start = (seen - real)[:, kv_len - q_len :] - q_pos
    sink = torch.arange(sinks, device=device)
    sink_slot = torch.searchsorted(seen, (start[:, :, None] + sink + 1).reshape(batch, -1))
    sink_slot = sink_slot.clamp(max=kv_len - 1).reshape(batch, q_len, sinks)
    beyond = q_pos[:, :, None] - sink >= feature.window  # (B, Sq, sinks); such a sink exists and precedes q
    true_pos = q_pos if position_offset is None else q_pos + position_offset.to(device)[:, None]
    cap = feature.sink_tokens + feature.window - 1 - sink if feature.positions == "cache" else feature.distance_limit
    move = (true_pos[:, :, None] - sink - cap).clamp(min=0)  # (B, Sq, sinks) positions

    chunk = max(1, min(q_len, _SINK_CHUNK_ELEMENTS // max(1, batch * max(heads, kv_heads) * sinks * head_dim)))
    maxes, sums, accs = [], [], []
    for q_start in range(0, q_len, chunk):
        q_stop = min(q_start + chunk, q_len)
        width = q_stop - q_start
        slots = sink_slot[:, q_start:q_stop].reshape(batch, 1, width * sinks, 1)
        keys = _GatherFloat.apply(key, slots.expand(batch, kv_heads, -1, head_dim))
        keys = rerotate(keys, move[:, q_start:q_stop].reshape(batch, -1), inv_freq)
        values = _GatherFloat.apply(value, slots.expand(batch, kv_heads, -1, value_dim))
        q_blk = query[:, :, q_start:q_stop].float().reshape(batch, kv_heads, groups, width, head_dim)
        keys = keys.reshape(batch, kv_heads, width, sinks, head_dim)
        scores = torch.einsum("bhgqd,bhqsd->bhgqs", q_blk, keys) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~beyond[:, None, None, q_start:q_stop], float("-inf"))
        row_max = scores.detach().amax(dim=-1)
        probs = torch.exp(scores - torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)[..., None])
        maxes.append(row_max.reshape(batch, heads, width))
        sums.append(probs.sum(dim=-1).reshape(batch, heads, width))
        values = values.reshape(batch, kv_heads, width, sinks, value_dim)
        accs.append(torch.einsum("bhgqs,bhqsd->bhgqd", probs, values).reshape(batch, heads, width, value_dim))
    return torch.cat(maxes, dim=2), torch.cat(sums, dim=2), torch.cat(accs, dim=2)


def sink_attention_forward(
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
    """Attention-registry entry point.

    Args:
        query: (B, H, Sq, D); key, value: (B, H_kv, Skv, D), not repeated for GQA.
        attention_mask: None or (B, Skv) bool padding mask (from ``flash_attention_mask``).
        sliding_window: the layer's own window (local layers of hybrid models): kept as is.
    Returns:
        ((B, Sq, H, D) contiguous, None).
    """
    check_call(ATTENTION_NAME, dropout, attention_mask)
    query, key, value = autocast_inputs(query, key, value)
    if sliding_window is not None:
        feature = SinkAttention(sink_tokens=0, window=sliding_window)
    else:
        feature = sink_parameters(module.config)
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    out = sink_attention(
        query,
        key,
        value,
        feature=feature,
        inv_freq=lambda: module_inv_freq(module, query.device),
        scale=scaling,
        softcap=softcap,
        s_aux=s_aux,
        kv_valid=attention_mask,
        segment_ids=packed_segments(position_ids, batch, q_len, kv_len) if attention_mask is None else None,
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``longctx_sink`` in both registries (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, sink_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, flash_attention_mask)
