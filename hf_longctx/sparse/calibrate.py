"""Per-head pattern choice (``lc.sparse.calibrate``) and the per-layer selection used by ``longctx_sparse``.

Calibration runs the model once over a text with ``longctx_sparse`` in place (every layer sparse, whatever the
length). In each full-attention layer, for every query head, it measures the share of the last ``last_q``
queries' exact attention mass that each pattern's selection keeps, and picks the pattern keeping more (ties go
to block_topk). The choice is stored as plain lists in the model's longctx config (``head_patterns``), so it
serialises in config.json.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from ..config import SparseAttention
from ..kernels.reference_sparse import block_mask_from_lists
from .estimate import SparseIndex, block_topk_index, fit_lists, last_query_probs, vertical_slash_index

_warned: set[str] = set()
# While calibrate() runs: {layer_idx: (B, H, 2) kept mass per head for (vertical_slash, block_topk)}.
_recording: dict | None = None


def head_patterns_for(feature: SparseAttention, layer_idx: int | None, heads: int) -> list[str]:
    """The pattern of each of a layer's ``heads`` query heads under ``feature``."""
    if feature.pattern != "auto":
        return [feature.pattern] * heads
    saved = feature.head_patterns
    if saved is not None and layer_idx is not None and layer_idx < len(saved) and len(saved[layer_idx]) == heads:
        return list(saved[layer_idx])
    if "uncalibrated" not in _warned and _recording is None:
        _warned.add("uncalibrated")
        warnings.warn("longctx_sparse: pattern='auto' without calibration (lc.sparse.calibrate) uses block_topk "
                      "for every head", stacklevel=3)
    return ["block_topk"] * heads


def _estimate(pattern: str, query, key, feature: SparseAttention, scale) -> SparseIndex:
    if pattern == "block_topk":
        return block_topk_index(query, key, block_size=feature.block_size, density=feature.density,
                                mass=feature.mass, scale=scale)
    return vertical_slash_index(query, key, block_size=feature.block_size, last_q=feature.last_q,
                                density=feature.density, mass=feature.mass, scale=scale)


def _merge(use_first: torch.Tensor, first: SparseIndex, second: SparseIndex) -> SparseIndex:
    """Per query head (``use_first`` (H,) bool) the selection of ``first`` (vertical_slash) or ``second``."""
    def pick(a, b):
        return torch.where(use_first.view(1, -1, *([1] * (a.dim() - 2))), a, b)

    count = first.column_count * use_first.view(1, -1, 1).to(first.column_count.dtype)
    width = max(first.full_kv_indices.shape[-1], second.full_kv_indices.shape[-1])
    return SparseIndex(pick(first.kv_num_blocks, second.kv_num_blocks), pick(first.kv_indices, second.kv_indices),
                       pick(first.full_kv_num_blocks, second.full_kv_num_blocks),
                       pick(fit_lists(first.full_kv_indices, width), fit_lists(second.full_kv_indices, width)),
                       count, first.column_index, first.block_size)


def kept_mass(probs: torch.Tensor, index: SparseIndex) -> torch.Tensor:
    """(B, H) mean over the last queries of the attention mass ``index`` keeps; ``probs`` (B, H, lq, S)."""
    B, H, lq, S = probs.shape
    n = index.kv_num_blocks.shape[-1]
    bs = index.block_size
    rows = torch.arange(S - lq, S, device=probs.device)
    blocks = block_mask_from_lists(index.kv_num_blocks, index.kv_indices, n) | block_mask_from_lists(
        index.full_kv_num_blocks, index.full_kv_indices, n)
    keys = blocks[:, :, rows // bs][..., torch.arange(S, device=probs.device) // bs]  # (B, H, lq, S)
    if index.column_count is not None:
        used = torch.arange(index.column_index.shape[-1], device=probs.device) < index.column_count[..., None]
        cols = torch.where(used, index.column_index.long(), S)[:, :, rows // bs]
        extra = torch.zeros(B, H, lq, S + 1, dtype=torch.bool, device=probs.device).scatter_(-1, cols, True)
        keys = keys | extra[..., :S]
    return (probs * keys).sum(-1).mean(-1)


def sparse_index(query: torch.Tensor, key: torch.Tensor, feature: SparseAttention, layer_idx: int | None = None,
                 scale: float | None = None) -> SparseIndex:
    """The selection of one layer's prefill: each head's pattern (``head_patterns_for``) estimated on its
    query (B, H, S, D) and key (B, H_kv, S, D)."""
    heads = query.shape[1]
    patterns = head_patterns_for(feature, layer_idx, heads)
    vs = block = None
    if "vertical_slash" in patterns or _recording is not None:
        vs = _estimate("vertical_slash", query, key, feature, scale)
    if "block_topk" in patterns or _recording is not None:
        block = _estimate("block_topk", query, key, feature, scale)
    if _recording is not None and layer_idx is not None:
        probs = torch.cat([last_query_probs(query, key, feature.last_q, slice(h, h + 1), scale)
                           for h in range(heads)], dim=1)
        _recording[layer_idx] = torch.stack([kept_mass(probs, vs), kept_mass(probs, block)], dim=-1)
    if block is None:
        return vs
    if vs is None:
        return block
    use_vs = torch.tensor([p == "vertical_slash" for p in patterns], device=query.device)
    return _merge(use_vs, vs, block)


def calibrate(model, text_or_input_ids, tokenizer=None, **feature_fields) -> SparseAttention:
    """Pick each head's pattern on a calibration text and store it in the model's longctx config.

    Args:
        model: a causal LM, patched with ``attention="sparse"`` or not (then it is patched with
            ``SparseAttention(**feature_fields)``); its other features are kept.
        text_or_input_ids: a string (needs ``tokenizer``), or (B, S) / (S,) token ids.
        tokenizer: the model's tokenizer, for a string.
        **feature_fields: SparseAttention fields (density, mass, last_q, block_size ...) overriding the current.
    Returns:
        The SparseAttention now in effect (``pattern="auto"``, ``head_patterns`` set); ``model.config.longctx``
        holds it, so ``save_pretrained`` keeps it and ``lc.from_pretrained`` re-applies it.
    """
    global _recording
    from ..patching import patch, patched_config

    if isinstance(text_or_input_ids, str):
        if tokenizer is None:
            raise ValueError("calibrate: a text needs `tokenizer` (or give input_ids)")
        input_ids = tokenizer(text_or_input_ids, return_tensors="pt").input_ids
    elif isinstance(text_or_input_ids, torch.Tensor) and text_or_input_ids.dim() in (1, 2):
        input_ids = text_or_input_ids if text_or_input_ids.dim() == 2 else text_or_input_ids[None]
    else:
        raise ValueError("calibrate: `text_or_input_ids` must be a string or a (B, S) / (S,) tensor of token ids, "
                         f"got {type(text_or_input_ids).__name__}")
    current = patched_config(model)
    base = current.attention if current is not None and isinstance(current.attention, SparseAttention) else None
    fields = {**(dataclasses.asdict(base) if base is not None else {}), **feature_fields, "pattern": "auto"}
    fields.pop("head_patterns", None)
    feature = SparseAttention(**fields)
    others = {} if current is None else {k: getattr(current, k) for k in ("rope", "kv", "speculative")}
    # measure with every layer sparse, whatever the calibration length
    patch(model, attention=dataclasses.replace(feature, min_seq_len=1), **others)
    _recording = {}
    try:
        with torch.no_grad():
            model(input_ids=input_ids.to(model.device))
        recorded = _recording
    finally:
        _recording = None
    if not recorded:
        raise ValueError("calibrate: no layer ran longctx_sparse (is the model's attention routed through "
                         "transformers' attention registry?)")
    layers = max(recorded) + 1
    heads = next(iter(recorded.values())).shape[1]
    patterns = []
    for layer in range(layers):
        if layer not in recorded:  # a local (sliding-window) layer: it stays dense
            patterns.append(["block_topk"] * heads)
            continue
        mass = recorded[layer].mean(0)  # (H, 2)
        patterns.append(["vertical_slash" if float(m[0]) > float(m[1]) else "block_topk" for m in mass])
    feature = dataclasses.replace(feature, head_patterns=patterns)
    patch(model, attention=feature, **others)
    return feature
