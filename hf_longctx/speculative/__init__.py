"""Speculative decoding: the decoding loop (``custom_generate`` callable), the drafters (a draft model, or the
target over a view of its own cache), per-row sequences, the verification rules (greedy prefix, rejection
sampling), the adaptive rules, and the graph-captured self-speculation rounds."""

from .drafter import DraftModel, Drafter, SelfDraft, load_draft
from .gain import DraftLength, SpeculationGain
from .generate import bind_generate, speculative_generate
from .rounds import StaticRounds
from .sequences import Sequences
from .verify import common_acceptance, greedy_accept, sample_accept

__all__ = [
    "DraftLength",
    "DraftModel",
    "Drafter",
    "SelfDraft",
    "Sequences",
    "SpeculationGain",
    "StaticRounds",
    "bind_generate",
    "common_acceptance",
    "greedy_accept",
    "load_draft",
    "sample_accept",
    "speculative_generate",
]
