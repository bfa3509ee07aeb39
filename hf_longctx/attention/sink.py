"""``longctx_sink``: sink/window attention behind transformers' attention registry.

Models call ``fn(module, query, key, value, attention_mask, dropout=..., scaling=..., **kwargs)``
(see ``transformers.integrations.sdpa_attention``) and expect ``(out[B, Sq, H, D], None)``. The
mask registry entry is transformers' ``flash_attention_mask``: ``attention_mask`` arrives as None or
the 2D (B, Skv) padding mask, never as a 4D tensor (which would be O(S^2) memory).

Parameters come from ``module.config.longctx["attention"]`` (written by ``patch``); a model loaded
with ``attn_implementation="longctx_sink"`` and no such key uses ``SinkAttention()``'s defaults.
"""

from __future__ import annotations

import warnings

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from ..config import SinkAttention, parse_feature
from ..kernels import reference

ATTENTION_NAME = "longctx_sink"
_warned_fallbacks: set[str] = set()


def sink_parameters(config) -> SinkAttention:
    """The SinkAttention a model config asks for (its ``longctx`` key), defaults otherwise."""
    saved = (getattr(config, "longctx", None) or {}).get("attention")
    feature = parse_feature("attention", saved) if saved else None
    return feature if isinstance(feature, SinkAttention) else SinkAttention()


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


def sink_window_attention(query, key, value, **kwargs) -> torch.Tensor:
    """Dispatch: CUDA tensors to the Triton kernel, others to the PyTorch reference.

    Shapes and keywords as ``kernels.reference.sink_window_attention``; returns (B, H, Sq, D). CUDA
    inputs the kernel cannot take (float32, an unsupported head_dim, ...) run on the reference, with
    a warning once per reason.
    """
    if query.is_cuda:
        try:
            from ..kernels import sink_window
        except ImportError as exc:  # triton missing or broken on this machine
            reason = f"the Triton kernel cannot be imported ({exc})"
        else:
            reason = sink_window.unsupported_reason(query, key, value, **kwargs)
            if reason is None:
                return sink_window.sink_window_attention_triton(query, key, value, **kwargs)
        if reason not in _warned_fallbacks:
            _warned_fallbacks.add(reason)
            warnings.warn(f"longctx_sink: {reason}; using the slow PyTorch reference on CUDA", stacklevel=3)
    return reference.sink_window_attention(query, key, value, **kwargs)


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
    if dropout:
        raise ValueError(f"longctx_sink does not implement attention dropout; got dropout={dropout}")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"longctx_sink takes a 2D (batch, kv_length) padding mask, got attention_mask of shape "
            f"{tuple(attention_mask.shape)}"
        )
    if sliding_window is not None:
        sink_tokens, window = 0, sliding_window
    else:
        params = sink_parameters(module.config)
        sink_tokens, window = params.sink_tokens, params.window
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    out = sink_window_attention(
        query,
        key,
        value,
        sink_tokens=sink_tokens,
        window=None if window >= kv_len else window,
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
