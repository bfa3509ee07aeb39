"""Whether speculation pays: the switch-off rule of ``num_draft_tokens="adaptive"``.

Speculation pays when a round's tokens cost less time than the same tokens decoded plainly. Both are measured
in the call itself, on the same cache and batch: first ``warmup`` speculative rounds (each row emits its
accepted drafts plus one token), then ``warmup`` plain steps (one token a row, through the same path plain
decoding would take: a graph-replayed step where the drafter has one), each timed from one host read to the
next. Speculation goes on if its tokens per second per row beat the plain steps', and is switched off for the
rest of the call otherwise. Rounds that do one-time work (kernel compilation, graph capture) are not counted.

An estimate instead of the plain measurement (verification time as the cost of a plain step) overrates
speculation wherever plain steps are graph-captured and the verification is not, as it is here.
"""

from __future__ import annotations


class SpeculationGain:
    """The measurements of both modes and the decision.

    Args:
        warmup: speculative rounds, then plain steps, measured before deciding (>= 1 each, besides the
            uncounted ones).
    Raises:
        ValueError: ``warmup`` < 1.
    """

    def __init__(self, warmup: int = 4):
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"SpeculationGain: `warmup` must be an integer >= 1, got {warmup!r}")
        self.warmup = warmup
        self.seconds = {"speculative": 0.0, "plain": 0.0}
        self.tokens = {"speculative": 0.0, "plain": 0.0}  # per row
        # not counted: the first speculative round (it warms up and captures the draft step), and three plain
        # rounds: the one after the prefill, then the two that warm up and capture a graph-replayed plain step
        self.rounds = {"speculative": -1, "plain": -3}
        self.enabled = True  # speculation still allowed (False: switched off for the rest of the call)
        self.decided = False

    @property
    def mode(self) -> str:
        """What the next round runs: "speculative" or "plain"."""
        if self.decided:
            return "speculative" if self.enabled else "plain"
        return "speculative" if self.rounds["speculative"] < self.warmup else "plain"

    def record(self, mode: str, tokens_per_row: float, seconds: float) -> None:
        """One round of ``mode``: mean tokens emitted per active row, and its wall time in seconds."""
        self.rounds[mode] += 1
        if self.rounds[mode] > 0 and not self.decided:
            self.tokens[mode] += tokens_per_row
            self.seconds[mode] += seconds
        if not self.decided and self.rounds["plain"] >= self.warmup:
            self.decided = True
            self.enabled = self.gain >= 1

    @property
    def gain(self) -> float:
        """Measured speedup of speculation over plain steps (tokens per second per row, inf before both are
        measured)."""
        if min(self.seconds.values()) <= 0 or min(self.tokens.values()) <= 0:
            return float("inf")
        rate = {mode: self.tokens[mode] / self.seconds[mode] for mode in self.seconds}
        return rate["speculative"] / rate["plain"]
