"""Run a causal LM over the tokens its cache has not seen yet: the one forward both the target and a
draft model use (prefill, drafting steps and the target's verification pass alike)."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


def forward_unseen(
    model: torch.nn.Module,
    cache: Cache,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    keep: int,
) -> torch.Tensor:
    """Feed ``input_ids[:, cache.get_seq_length():]`` to ``model``, updating ``cache`` in place.

    Args:
        model: a causal LM.
        cache: its cache; its logical length (tokens seen) says which columns of ``input_ids`` are new.
        input_ids: (B, S) int64 the whole sequence so far (left padding included).
        attention_mask: (B, S) 2D padding mask of ``input_ids``, or None when no row has padding.
        keep: how many of the last positions to return logits for.
    Returns:
        (B, keep, V) float32 logits of the last ``keep`` new tokens.
    """
    seen, length = cache.get_seq_length(), input_ids.shape[1]
    if attention_mask is None:
        positions = torch.arange(seen, length, device=input_ids.device).expand(input_ids.shape[0], -1)
    else:
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)[:, seen:]
    outputs = model(
        input_ids=input_ids[:, seen:],
        attention_mask=attention_mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=keep,
    )
    return outputs.logits[:, -keep:].float()
