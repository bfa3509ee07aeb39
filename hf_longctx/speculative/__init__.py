"""Speculative decoding: the decoding loop (``custom_generate`` callable), the draft model, and the
verification rules (greedy prefix, rejection sampling)."""

from .drafter import DraftModel, load_draft
from .generate import bind_generate, speculative_generate
from .verify import common_acceptance, greedy_accept, sample_accept

__all__ = [
    "DraftModel",
    "bind_generate",
    "common_acceptance",
    "greedy_accept",
    "load_draft",
    "sample_accept",
    "speculative_generate",
]
