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


class DraftLength:
    """``num_draft_tokens="adaptive"`` for graph-captured rounds (``rounds.StaticRounds``): each round's draft length,
    chosen on the host from rates the call measured (tokens per row per second of rounds of each length), with no
    device read inside a round.

    A length is measured over ``warmup`` timed rounds, after ``skip`` rounds that are not timed (an eager warm-up and
    a graph capture). Starting at ``start``, the rule then tries the untried neighbours (G - 1, then G + 1) of the
    best length measured so far, one at a time, and once both of the best one's neighbours are measured it runs the
    best: a hill climb on measured rates, not on a cost model (the draft step's cost is not linear in G where
    launches dominate). G = 0 (plain steps in the rounds' frame) is a length like the others, so speculation is
    switched off where no length beats plain steps.

    Args:
        longest: the most drafts a round may have (>= 1); start: the first length measured.
    Raises:
        ValueError: ``longest`` < 1.
    """

    def __init__(self, longest: int, start: int = 2, warmup: int = 5, skip: int = 2):
        if isinstance(longest, bool) or not isinstance(longest, int) or longest < 1:
            raise ValueError(f"DraftLength: `longest` must be an integer >= 1, got {longest!r}")
        self.longest, self.warmup, self.skip = longest, warmup, skip
        self.current = min(start, longest)
        self.rounds: dict[int, int] = {}  # rounds run per length
        self.seconds: dict[int, float] = {}  # timed seconds per length
        self.tokens: dict[int, float] = {}  # timed tokens per row per length

    def next(self) -> int:
        """The next round's draft length."""
        if self.rounds.get(self.current, 0) < self.skip + self.warmup or not self.tokens:
            return self.current
        best = max(self.tokens, key=self.rate)
        for drafts in (best - 1, best + 1):
            if 0 <= drafts <= self.longest and drafts not in self.rounds:
                self.current = drafts
                return drafts
        self.current = best
        return best

    def record(self, drafts: int, seconds: float, accepted: int, rows: int) -> None:
        """One round: its length, wall time, accepted drafts summed over its active rows, and those rows."""
        done = self.rounds.get(drafts, 0)
        self.rounds[drafts] = done + 1
        if done >= self.skip and rows:
            self.seconds[drafts] = self.seconds.get(drafts, 0.0) + seconds
            self.tokens[drafts] = self.tokens.get(drafts, 0.0) + (accepted + rows) / rows

    def rate(self, drafts: int) -> float:
        """Measured tokens per row per second of rounds with ``drafts`` drafts."""
        return self.tokens[drafts] / self.seconds[drafts] if self.seconds.get(drafts) else 0.0
