"""``longctx_softplus``: softplus attention (LSSA / LSSAR) behind transformers' attention registry.

Same call contract as ``attention/sink.py`` (registry signature, ``flash_attention_mask`` for padding, packed
sequences from position ids). Parameters come from ``module.config.longctx["attention"]`` (written by
``patch``); a model loaded with ``attn_implementation="longctx_softplus"`` and no such key uses
``SoftplusAttention()``'s defaults (LSSAR, p = 15). The logits ignore ``scaling`` (q and k are normalised and
scaled by log(D) log(N_i); see ``kernels/reference_softplus.py``). CUDA tensors run the Triton kernels,
others the PyTorch reference.
"""

from __future__ import annotations

import warnings

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from ..config import SoftplusAttention, parse_feature
from ..kernels import reference_softplus
from .sink import autocast_inputs, check_call, packed_segments

SOFTPLUS_ATTENTION_NAME = "longctx_softplus"
_warned_fallbacks: set[str] = set()


def softplus_parameters(config) -> SoftplusAttention:
    """The SoftplusAttention a model config asks for (its ``longctx`` key), defaults otherwise."""
    saved = (getattr(config, "longctx", None) or {}).get("attention")
    feature = parse_feature("attention", saved) if saved else None
    return feature if isinstance(feature, SoftplusAttention) else SoftplusAttention()


def softplus_attention(query, key, value, **kwargs) -> torch.Tensor:
    """Dispatch: CUDA tensors to the Triton kernel, others to the PyTorch reference.

    Shapes and keywords as ``kernels.reference_softplus.softplus_attention``; returns (B, H, Sq, D). CUDA inputs
    the kernel cannot take (float32, an unsupported head_dim, ...) run on the reference, warning once per reason.
    """
    if query.is_cuda:
        try:
            from ..kernels import softplus
        except ImportError as exc:  # triton missing or broken on this machine
            reason = f"the Triton kernel cannot be imported ({exc})"
        else:
            checked = {name: value for name, value in kwargs.items() if name != "query_chunk"}
            reason = softplus.unsupported_reason(query, key, value, **checked)
            if reason is None:
                return softplus.softplus_attention_triton(query, key, value, **kwargs)
        if reason not in _warned_fallbacks:
            _warned_fallbacks.add(reason)
            warnings.warn(f"{SOFTPLUS_ATTENTION_NAME}: {reason}; using the slow PyTorch reference on CUDA",
                          stacklevel=3)
    return reference_softplus.softplus_attention(query, key, value, **kwargs)


def softplus_attention_forward(
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
        scaling: ignored (softplus attention sets its own logit scale).
        sliding_window, softcap, s_aux: not defined for softplus attention: ValueError when set.
    Returns:
        ((B, Sq, H, D) contiguous, None).
    """
    check_call(SOFTPLUS_ATTENTION_NAME, dropout, attention_mask)
    query, key, value = autocast_inputs(query, key, value)
    for name, given in (("sliding_window", sliding_window), ("softcap", softcap), ("s_aux", s_aux)):
        if given is not None:
            raise ValueError(f"{SOFTPLUS_ATTENTION_NAME}: layers with {name} are not supported (softplus attention "
                             f"is dense causal with its own logits); got {name}={given!r}")
    feature = softplus_parameters(module.config)
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    out = softplus_attention(
        query, key, value, reweight=feature.reweight, power=feature.power, kv_valid=attention_mask,
        segment_ids=packed_segments(position_ids, batch, q_len, kv_len) if attention_mask is None else None,
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``longctx_softplus`` in both registries (idempotent)."""
    AttentionInterface.register(SOFTPLUS_ATTENTION_NAME, softplus_attention_forward)
    AttentionMaskInterface.register(SOFTPLUS_ATTENTION_NAME, flash_attention_mask)
