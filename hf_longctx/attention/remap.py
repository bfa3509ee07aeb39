"""``longctx_rope_remap``: Self-Extend and dual-chunk attention behind transformers' attention registry.

The model rotates queries and keys at their true positions and caches keys after RoPE, as usual; this
attention function re-rotates them to the far positions of the scheme on the fly (a rotation composes,
so this is exact) and merges the near and far parts in one softmax (``kernels.reference_remap``). The
cache, prefill, chunked prefill and decode need nothing else: every call sees all cached keys.

Parameters come from ``module.config.longctx["rope"]`` (written by ``patch``), a ``RopeScaling`` of type
``self_extend`` or ``dual_chunk``; the rotary frequencies are the model's own, recomputed from its
``rope_parameters``. Registered in the mask registry with ``flash_attention_mask`` (None or the 2D padding
mask); padding and packed sequences are handled as in ``longctx_sink``. Layers with a sliding window of
their own (Gemma 2's local layers) keep it: they run ``longctx_sink``'s path with that window.
"""

from __future__ import annotations

import warnings

import torch
from transformers import AttentionInterface
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from ..config import RopeScaling, parse_feature
from ..kernels import reference_remap
from ..kernels.reference_remap import RemapScheme
from ..rope.frequencies import default_inv_freq, rotary_dim
from .sink import autocast_inputs, check_call, packed_segments, sink_attention_forward

REMAP_ATTENTION_NAME = "longctx_rope_remap"
_SCALED_LAYER_TYPE = "full_attention"  # the layers of a per-layer-type rope (Gemma 3) that are remapped
_warned_fallback = False


def remap_scheme(config) -> RemapScheme:
    """The RemapScheme of a model config's ``longctx["rope"]``; ValueError if it has none."""
    saved = (getattr(config, "longctx", None) or {}).get("rope")
    feature = parse_feature("rope", saved) if saved else None
    if not isinstance(feature, RopeScaling) or not feature.on_attention_path:
        raise ValueError(
            f"{REMAP_ATTENTION_NAME} needs a rope feature of type 'self_extend' or 'dual_chunk' in the model "
            f"config's `longctx` key, got {saved!r}; use lc.patch(model, rope='self_extend:WINDOW,GROUP')"
        )
    if feature.type == "self_extend":
        return RemapScheme("self_extend", window=feature.window, group=feature.group)
    return RemapScheme("dual_chunk", chunk_size=feature.chunk_size, local_size=feature.local_size)


def rotary_frequencies(config, device: torch.device) -> torch.Tensor:
    """(R / 2,) float32: the inverse frequencies the model's rotary embedding applies to full-attention layers.

    Computed on the CPU and moved, as the rotary modules build theirs, so the values are the same bits.
    """
    parameters = config.rope_parameters
    layer_type = _SCALED_LAYER_TYPE if _SCALED_LAYER_TYPE in parameters else None
    if layer_type is not None:
        parameters = parameters[layer_type]
    if parameters["rope_type"] == "default":
        inv_freq = default_inv_freq(parameters["rope_theta"], rotary_dim(config, parameters))
    else:
        kwargs = {} if layer_type is None else {"layer_type": layer_type}
        inv_freq, _ = ROPE_INIT_FUNCTIONS[parameters["rope_type"]](config, **kwargs)
    return inv_freq.to(device=device, dtype=torch.float32)


def remap_attention(query, key, value, **kwargs) -> torch.Tensor:
    """Dispatch: CUDA tensors to the Triton kernel, others to the PyTorch reference.

    Shapes and keywords as ``kernels.reference_remap.remap_attention``; returns (B, H, Sq, D).
    """
    global _warned_fallback
    if query.is_cuda:
        try:
            from ..kernels import remap
        except ImportError as exc:  # triton missing or broken on this machine
            reason = f"the Triton kernel cannot be imported ({exc})"
        else:
            return remap.remap_attention_triton(query, key, value, **kwargs)
        if not _warned_fallback:
            warnings.warn(f"{REMAP_ATTENTION_NAME}: {reason}; using the slow PyTorch reference on CUDA", stacklevel=3)
            _warned_fallback = True
    return reference_remap.remap_attention(query, key, value, **kwargs)


def rope_remap_attention_forward(
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
        query: (B, H, Sq, D) post-RoPE; key, value: (B, H_kv, Skv, D), not repeated for GQA.
        attention_mask: None or (B, Skv) bool padding mask (from ``flash_attention_mask``).
        sliding_window: the layer's own window (local layers of hybrid models): kept as is.
    Returns:
        ((B, Sq, H, D) contiguous, None).
    """
    if sliding_window is not None:
        return sink_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            sliding_window=sliding_window, softcap=softcap, s_aux=s_aux, position_ids=position_ids,
        )
    check_call(REMAP_ATTENTION_NAME, dropout, attention_mask)
    query, key, value = autocast_inputs(query, key, value)
    if s_aux is not None:
        raise ValueError(f"{REMAP_ATTENTION_NAME} does not support learned sink logits (s_aux)")
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    out = remap_attention(
        query,
        key,
        value,
        inv_freq=rotary_frequencies(module.config, query.device),
        scheme=remap_scheme(module.config),
        scale=scaling,
        softcap=softcap,
        kv_valid=attention_mask,
        segment_ids=packed_segments(position_ids, batch, q_len, kv_len) if attention_mask is None else None,
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``longctx_rope_remap`` in both registries (idempotent)."""
    AttentionInterface.register(REMAP_ATTENTION_NAME, rope_remap_attention_forward)
    AttentionMaskInterface.register(REMAP_ATTENTION_NAME, flash_attention_mask)
