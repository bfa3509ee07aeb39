"""``longctx_sparse``: dynamic block-sparse prefill behind transformers' attention registry.

A prefill (query length == key length) of at least ``SparseAttention.min_seq_len`` tokens without padding runs
block-sparse: each head's selection is estimated on the device (``hf_longctx.sparse``), then the Triton
block-sparse kernel runs it (the PyTorch reference on CPU). Everything else (short prompts, decode, chunked
prefill with a cache, padded or packed batches, a layer's own sliding window) runs dense causal attention through
``longctx_sink``'s dispatch (the sink kernel in dense mode on CUDA, its reference on CPU). Soft-capping and
learned sinks have no sparse kernel: a sparse-length prefill with them is a ValueError.

The mask registry entry is ``flash_attention_mask`` (None or the 2D padding mask), as for ``longctx_sink``.
Parameters come from ``module.config.longctx["attention"]`` (``SparseAttention()``'s defaults without it).
"""

from __future__ import annotations

import warnings

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from ..config import SparseAttention, parse_feature
from ..kernels import reference_sparse
from ..sparse.calibrate import sparse_index
from .sink import autocast_inputs, check_call, packed_segments, sink_window_attention

SPARSE_ATTENTION_NAME = "longctx_sparse"
_warned_fallbacks: set[str] = set()


def sparse_parameters(config) -> SparseAttention:
    """The SparseAttention a model config asks for (its ``longctx`` key), defaults otherwise."""
    saved = (getattr(config, "longctx", None) or {}).get("attention")
    feature = parse_feature("attention", saved) if saved else None
    return feature if isinstance(feature, SparseAttention) else SparseAttention()


def block_sparse_attention(query, key, value, kv_num_blocks, kv_indices, **kwargs) -> torch.Tensor:
    """Dispatch: CUDA tensors to the Triton kernel, others to the PyTorch reference (arguments and result as
    ``kernels.reference_sparse.block_sparse_attention``). CUDA inputs the kernel cannot take run on the
    reference with a warning once per reason."""
    if query.is_cuda:
        try:
            from ..kernels import block_sparse
        except ImportError as exc:
            reason = f"the Triton kernel cannot be imported ({exc})"
        else:
            reason = block_sparse.unsupported_reason(query, key, value, kwargs.get("block_size", 128),
                                                     kwargs.get("scale"))
            if reason is None:
                return block_sparse.block_sparse_attention_triton(query, key, value, kv_num_blocks, kv_indices,
                                                                  **kwargs)
        if reason not in _warned_fallbacks:
            _warned_fallbacks.add(reason)
            warnings.warn(f"{SPARSE_ATTENTION_NAME}: {reason}; using the slow PyTorch reference on CUDA", stacklevel=3)
    return reference_sparse.block_sparse_attention(query, key, value, kv_num_blocks, kv_indices, **kwargs)


def sparse_attention_forward(
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
    Returns:
        ((B, Sq, H, D) contiguous, None).
    """
    check_call(SPARSE_ATTENTION_NAME, dropout, attention_mask)
    query, key, value = autocast_inputs(query, key, value)
    feature = sparse_parameters(module.config)
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    segments = packed_segments(position_ids, batch, q_len, kv_len) if attention_mask is None else None
    sparse = (q_len == kv_len and q_len >= feature.min_seq_len and attention_mask is None and segments is None
              and sliding_window is None)
    if sparse and (softcap is not None or s_aux is not None):
        raise ValueError(f"{SPARSE_ATTENTION_NAME}: the block-sparse kernel has no soft-capping or learned sinks "
                         f"(softcap={softcap}, s_aux given: {s_aux is not None}); raise min_seq_len above the prompt "
                         "length for this model")
    if not sparse:
        out = sink_window_attention(query, key, value, sink_tokens=0, window=sliding_window, scale=scaling,
                                    softcap=softcap, s_aux=s_aux, kv_valid=attention_mask, segment_ids=segments)
        return out.transpose(1, 2).contiguous(), None
    index = sparse_index(query, key, feature, getattr(module, "layer_idx", None), scaling)
    out = block_sparse_attention(query, key, value, index.kv_num_blocks, index.kv_indices, scale=scaling,
                                 **index.kernel_kwargs())
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``longctx_sparse`` in both registries (idempotent)."""
    AttentionInterface.register(SPARSE_ATTENTION_NAME, sparse_attention_forward)
    AttentionMaskInterface.register(SPARSE_ATTENTION_NAME, flash_attention_mask)
