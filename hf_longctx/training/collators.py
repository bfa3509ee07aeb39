"""E2-LLM augmentation as a data collator: random RoPE scale and position skip per sample, at training time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import default_data_collator

from ..rope.augment import E2LLMAugmentation


class E2LLMCollator:
    """Collate with ``base``, then give every row E2-LLM augmented ``position_ids`` and an explicit all-ones
    ``attention_mask`` (so that the non-unit-step positions are not read as packed sequences).

    Args:
        augmentation: the scales and target length (``hf_longctx.rope.augment.E2LLMAugmentation``).
        base: the collator that builds ``input_ids`` (B, S) (and labels); default ``default_data_collator``.
        seed: seed of the draws, for reproducible runs; None draws from torch's global generator.
    The model must train on sdpa or eager attention: ``longctx_*`` attention reads position ids that do not
    count up by one as packed sequences (see ``hf_longctx.rope.augment``).
    Unpadded rows only: packed batches (``position_ids`` from the base collator) and padded batches (an
    ``attention_mask`` with zeros) raise ValueError.
    """

    def __init__(self, augmentation: E2LLMAugmentation,
                 base: Callable[[list[Any]], dict[str, torch.Tensor]] = default_data_collator, seed: int | None = None):
        self.augmentation = augmentation
        self.base = base
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def __call__(self, features: list[Any]) -> dict[str, torch.Tensor]:
        batch = dict(self.base(features))
        if "position_ids" in batch:
            raise ValueError("E2LLMCollator: `base` returned position_ids (packed rows); use an unpacking collator")
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            raise ValueError("E2LLMCollator: `base` returned padded rows; E2-LLM needs full-length rows")
        positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        batch["position_ids"] = self.augmentation(positions, generator=self.generator).to(ids.device)
        batch["attention_mask"] = torch.ones_like(ids)
        return batch
