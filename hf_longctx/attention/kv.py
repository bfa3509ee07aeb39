"""``longctx_kv``: dense attention over the slots a ``LongCtxCache`` layer stores, feeding it scores.

With KV eviction the stored keys are no longer contiguous positions, and which slots hold padding is
known only to the cache layer; eviction policies need the post-RoPE queries, which only the attention
function sees. transformers passes neither the cache nor the layer to the attention function, so the
two meet through an explicit hand-off:

1. ``LongCtxLayer.update`` stores the new keys and calls :func:`announce` with itself and the key
   tensor it returns;
2. the model passes that tensor straight to the attention function, which calls :func:`claim` with
   its ``key`` argument: it gets the layer back only if the tensor is the announced one (any other
   cache, or none, gives None);
3. the attention function calls ``layer.observe(query, key, attention_mask, scaling, softcap)``: the layer
   records the padding of the new slots (the last ``Sq`` columns of the 2D mask), updates its policy's
   scores and returns the (B, S_stored) validity of its slots, which replaces the mask (None while no
   padding was ever stored: no mask, and no device sync to convert one).

The announcement lives in a ``ContextVar``, so concurrent threads do not see each other's. Keys from
other caches (or no cache) are attended with the 2D padding mask, as ``longctx_sink`` does.

If the model's config carries a sink/window attention feature (``patch(model, attention="sink:...",
kv=...)``), the sink rule is applied over the stored slots: sinks are the first stored real tokens and
the window counts stored real tokens (which, after eviction, span more positions than the window). Its
positions rule (``longctx_sink``'s ``sink_attention``) learns the queries' true positions from the tokens
each row evicted (``LongCtxLayer.position_offset``).

Static decoding (a layer's ``static_step``, for CUDA graphs: ``hf_longctx.cache.graphs``): ``key`` and ``value`` are
the layer's whole (B, H_kv, capacity, D) buffers and only the slots below its DEVICE counter hold tokens. The query
is attended over them from the buffers' last slot (``reserve_static`` keeps one spare), so the kernels count it
one position past its own key: a window w is asked as w + 1, and moved sinks get their offsets to match (see
:func:`_static_attention`). On CUDA the kernel takes the rows' key spans from the device (no host sync), moved
sinks (``positions="cache"``, ``distance_limit``) included: ``sink_attention`` hands the spans to the kernel and
computes the moved sinks from the 2D mask on the device.

Self-speculation: while a layer has a draft view (``LongCtxLayer.set_view``, a ``SinkAttention``), the
function attends through that sink + window rule over the stored slots instead (keys at their true
positions; the sink kernel reads only the sinks and the window), and reports nothing to the policy.
"""

from __future__ import annotations

import dataclasses
from contextvars import ContextVar
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from ..config import SinkAttention, parse_feature
from .sink import (autocast_inputs, check_call, module_inv_freq, packed_segments, sink_attention,
                   sink_window_attention)

KV_ATTENTION_NAME = "longctx_kv"

_announced: ContextVar[tuple[Any, torch.Tensor] | None] = ContextVar("longctx_kv_announced", default=None)


def announce(layer: Any, keys: torch.Tensor) -> None:
    """Record that ``keys`` (returned by ``layer.update``) is about to reach the attention function."""
    _announced.set((layer, keys))


def claim(key: torch.Tensor) -> Any:
    """The layer that announced exactly this ``key`` tensor (and forget it), or None."""
    announced = _announced.get()
    if announced is None or announced[1] is not key:
        return None
    _announced.set(None)
    return announced[0]


def _sink_rule(module: torch.nn.Module, sliding_window: int | None, kv_len: int) -> SinkAttention:
    """This layer's rule: its own sliding window, the patched sink feature, or dense (a window over all
    ``kv_len`` stored keys)."""
    rule = static_rule(module.config, sliding_window)
    return rule if rule is not None else SinkAttention(sink_tokens=0, window=max(kv_len, 1))


def kv_attention_forward(
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
        query: (B, H, Sq, D); key, value: (B, H_kv, S, D) as stored, the Sq new tokens last.
        attention_mask: None or the (B, kv_length) bool padding mask from ``flash_attention_mask``.
        sliding_window: the layer's own window (local layers of hybrid models): kept as is.
    Returns:
        ((B, Sq, H, D) contiguous, None).
    """
    check_call(KV_ATTENTION_NAME, dropout, attention_mask)
    query, key, value = autocast_inputs(query, key, value)
    layer = claim(key)
    if layer is not None and layer.static_step:
        return _static_attention(module, layer, query, key, value, scaling, sliding_window, softcap, s_aux), None
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    view = None if layer is None else layer.view
    if view is not None:  # self-speculation drafting: the sink + window view, no report to the policy
        kv_valid, feature = layer.view_valid(attention_mask), view
    else:
        kv_valid = attention_mask if layer is None else layer.observe(query, key, attention_mask, scaling, softcap)
        feature = _sink_rule(module, sliding_window, kv_len)
    segments = None
    if layer is None and kv_valid is None:
        segments = packed_segments(position_ids, batch, q_len, kv_len)
    out = sink_attention(
        query,
        key,
        value,
        feature=feature,
        inv_freq=lambda: module_inv_freq(module, query.device),
        position_offset=None if layer is None or view is not None else layer.position_offset,
        scale=scaling,
        softcap=softcap,
        s_aux=s_aux,
        kv_valid=kv_valid,
        segment_ids=segments,
    )
    return out.transpose(1, 2).contiguous(), None


def static_rule(config: Any, sliding_window: int | None) -> SinkAttention | None:
    """The sink/window rule of a static step (:func:`_sink_rule` without the stored length), None for dense;
    ``config``: the attention module's (text) config."""
    if sliding_window is not None:
        return SinkAttention(sink_tokens=0, window=sliding_window)
    saved = (getattr(config, "longctx", None) or {}).get("attention")
    feature = parse_feature("attention", saved) if saved else None
    return feature if isinstance(feature, SinkAttention) else None


def moves_sinks(feature: SinkAttention | None) -> bool:
    """Whether a rule may see a sink closer than it is (``positions="cache"`` or ``distance_limit``)."""
    return feature is not None and feature.sink_tokens > 0 and (
        feature.positions == "cache" or feature.distance_limit is not None)


def _static_spans(layer) -> torch.Tensor | None:
    """The layer's key spans for a static step, or None once it has holes (rejected drafts of speculative decoding):
    the kernel's decode path then reads its real-slot mask, converted on the device."""
    return None if layer.has_holes else layer.static_spans()


def _static_attention(module, layer, query, key, value, scaling, sliding_window, softcap, s_aux) -> torch.Tensor:
    """A static one-token step (module docstring): (B, Sq=1, H, D) contiguous attention over the slots below the
    layer's device counter, the query one past them (windows + 1); or a static block (``layer.block``): (B, Sq, H, D),
    the queries at their own slots from the counter on."""
    if layer.block:
        return _static_block_attention(module, layer, query, key, value, scaling, sliding_window, softcap, s_aux)
    if layer.policy is not None and layer.view is None:  # draft steps leave no scores
        layer.observe_static(query, scaling, softcap)
    feature = layer.view if layer.view is not None else static_rule(module.config, sliding_window)
    kwargs = dict(scale=scaling, softcap=softcap, s_aux=s_aux)
    if moves_sinks(feature):
        # The kernels see the query at logical index n (its true one is n - 1): with window w + 1 the "cache"
        # cap (sinks + window - 1 - t) grows by one too, so the true offset stands; a distance limit does not.
        offset = layer.position_offset
        if feature.distance_limit is not None:
            offset = (offset if offset is not None else layer.evicted.new_zeros(())) - 1
        shifted = dataclasses.replace(feature, window=feature.window + 1)
        out = sink_attention(query, key, value, feature=shifted, position_offset=offset,
                             inv_freq=lambda: module_inv_freq(module, query.device),
                             kv_valid=layer.static_kv_valid(), kv_spans=_static_spans(layer), **kwargs)
        return out.transpose(1, 2).contiguous()
    sinks, window = (0, None) if feature is None else (feature.sink_tokens, feature.window + 1)
    spans = _static_spans(layer) if query.is_cuda else None
    if spans is not None:
        from ..kernels import sink_window

        if sink_window.unsupported_reason(query, key, value, sink_tokens=sinks, window=window, **kwargs) is None:
            out = sink_window.sink_window_attention_segments(query, key, value, sink_tokens=sinks, window=window,
                                                             kv_spans=spans, **kwargs)
            return out.transpose(1, 2).contiguous()
    elif layer.has_holes:  # the kernel's decode path, with a layout the layers of this forward share
        out = _shared_layout_call(layer, query, key, value, sinks, window, layer.static_kv_valid, None, kwargs)
        if out is not None:
            return out
    # CPU (the reference), or what the kernel cannot take (the dispatcher warns once)
    out = sink_window_attention(query, key, value, sink_tokens=sinks, window=window,
                                kv_valid=layer.static_kv_valid(), **kwargs)
    return out.transpose(1, 2).contiguous()


def _shared_layout_call(layer, query, key, value, sinks, window, kv_valid, q_start, kwargs) -> torch.Tensor | None:
    """(B, Sq, H, D) contiguous: the kernel's decode path over a static step's masked slots, or None where the kernel
    cannot take the call (CPU tensors outside the Triton interpreter among them). The mask's layout
    (``sink_window.hole_layout``, some twenty small device ops) is computed once per forward and shared by the
    layers that hold the same slots (``LongCtxLayer.shared``: layers without a policy, whose validity and counter
    are equal), for the same rule and query rows."""
    try:
        from ..kernels import sink_window
    except ImportError:  # no usable triton: the dispatcher's reference
        return None
    q_len, groups = query.shape[2], query.shape[1] // key.shape[1]
    if not sink_window.takes_holes(q_len, groups) or sink_window.unsupported_reason(
            query, key, value, sink_tokens=sinks, window=window, **kwargs) is not None:
        return None
    shared = layer.shared if layer.policy is None else None
    name = ("layout", sinks, window, q_len, layer.block, layer.capacity)
    layout = None if shared is None else shared.get(name)
    if layout is None:
        layout = sink_window.hole_layout(kv_valid(), sinks, window, q_len, q_start)
        if shared is not None:
            shared[name] = layout
    spans, holes = layout
    out = sink_window.sink_window_attention_segments(query, key, value, sink_tokens=sinks, window=window,
                                                     kv_spans=spans, holes=holes, **kwargs)
    return out.transpose(1, 2).contiguous()


def _static_block_attention(module, layer, query, key, value, scaling, sliding_window, softcap, s_aux):
    """A static block: the Sq queries sit at the Sq slots from the layer's device counter (the kernel's ``q_start``,
    read on the device), causal among themselves, over the real slots before them."""
    feature = static_rule(module.config, sliding_window)
    if moves_sinks(feature):
        raise ValueError("longctx_kv: a static block cannot apply a sink rule that moves its sinks "
                         "(positions='cache' or distance_limit)")
    sinks, window = (0, None) if feature is None else (feature.sink_tokens, feature.window)
    kwargs = dict(scale=scaling, softcap=softcap, s_aux=s_aux)
    out = _shared_layout_call(layer, query, key, value, sinks, window, layer.block_kv_valid, layer.static_length,
                              kwargs)
    if out is not None:
        return out
    out = sink_window_attention(query, key, value, sink_tokens=sinks, window=window, kv_valid=layer.block_kv_valid(),
                                q_start=layer.static_length, **kwargs)
    return out.transpose(1, 2).contiguous()


def register() -> None:
    """Register ``longctx_kv`` in both registries (idempotent)."""
    AttentionInterface.register(KV_ATTENTION_NAME, kv_attention_forward)
    AttentionMaskInterface.register(KV_ATTENTION_NAME, flash_attention_mask)
