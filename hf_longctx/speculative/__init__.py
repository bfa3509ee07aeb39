"""Speculative decoding: the decoding loop (``custom_generate`` callable), the drafters (a draft model, or the
target over a view of its own cache), per-row sequences, the verification rules (greedy prefix, rejection
sampling) and the adaptive switch-off rule."""

from .drafter import DraftModel, Drafter, SelfDraft, load_draft
from .gain import SpeculationGain
from .generate import bind_generate, speculative_generate
from .sequences import Sequences
from .verify import common_acceptance, greedy_accept, sample_accept

__all__ = [
    "DraftModel",
    "Drafter",
    "SelfDraft",
    "Sequences",
    "SpeculationGain",
    "bind_generate",
    "common_acceptance",
    "greedy_accept",
    "load_draft",
    "sample_accept",
    "speculative_generate",
]
