"""Whether speculation pays: the switch-off rule of ``num_draft_tokens="adaptive"``.

A round drafts G tokens (time ``draft_s``) and verifies them in one target forward of G + 1 queries (time
``verify_s``); each active row then emits its accepted drafts plus one token. Plain decoding emits one token
per target forward, and one forward of a single query costs at most what the verification forward costs, so

    expected gain = (tokens emitted per row per round) * verify_s / (draft_s + verify_s)

is a lower bound of the speedup over plain decoding. When, after ``warmup`` rounds, the gain measured over
the rounds so far is under 1, speculation is switched off for the rest of the call (plain decoding, no draft).
"""

from __future__ import annotations


class SpeculationGain:
    """Accumulates the rounds' measurements and decides whether to keep speculating.

    Args:
        warmup: rounds measured before the rule may switch speculation off (>= 1); the first round, which
            includes one-time work (kernel compilation, allocation), is never counted.
    Raises:
        ValueError: ``warmup`` < 1.
    """

    def __init__(self, warmup: int = 4):
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"SpeculationGain: `warmup` must be an integer >= 1, got {warmup!r}")
        self.warmup = warmup
        self.rounds = -1  # the first round is not counted
        self.emitted = 0.0  # tokens per row, summed over the counted rounds
        self.draft_s = self.verify_s = 0.0
        self.enabled = True

    def record(self, emitted_per_row: float, draft_s: float, verify_s: float) -> None:
        """One round: mean tokens emitted per active row, drafting and verification wall times in seconds."""
        self.rounds += 1
        if self.rounds == 0:
            return
        self.emitted += emitted_per_row
        self.draft_s += draft_s
        self.verify_s += verify_s
        if self.rounds >= self.warmup and self.gain < 1:
            self.enabled = False

    @property
    def gain(self) -> float:
        """The expected speedup over plain decoding measured so far (inf before any counted round)."""
        if self.rounds <= 0 or self.draft_s + self.verify_s <= 0:
            return float("inf")
        return self.emitted / self.rounds * self.verify_s / (self.draft_s + self.verify_s)
