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


def expected_tokens(acceptance: float, drafts: int) -> float:
    """Tokens a round of ``drafts`` drafts emits per row when each draft token is accepted with probability
    ``acceptance`` (in [0, 1]), given the one before was: (1 - a^(G+1)) / (1 - a)."""
    if acceptance >= 1:
        return drafts + 1.0
    return (1 - acceptance ** (drafts + 1)) / (1 - acceptance)


class DraftLength:
    """``num_draft_tokens="adaptive"`` for graph-captured rounds (``rounds.StaticRounds``): each round's draft length,
    chosen on the host from what the call measured, with no device read inside a round.

    Measured: the acceptance rate a of draft tokens (accepted / tested: a row that rejects tests one more than it
    accepts) and the wall time t(G) of rounds with G drafts, modelled as t(G) = t(0) + G * s: t(0) from rounds
    without drafts (plain steps in the same frame), s from the others. Each round runs the G in 0..``longest``
    that maximises E(G) / t(G) (``expected_tokens``): G = 0, plain steps, when no length beats a plain step.
    First ``warmup`` rounds with G = ``start``, then ``warmup`` plain rounds, each after ``skip`` rounds that are not
    timed (an eager warm-up and a graph capture); a length first chosen later skips as many before it is timed.

    Args:
        longest: the most drafts a round may have (>= 1); start: the first length tried.
    Raises:
        ValueError: ``longest`` < 1.
    """

    def __init__(self, longest: int, start: int = 4, warmup: int = 3, skip: int = 2):
        if isinstance(longest, bool) or not isinstance(longest, int) or longest < 1:
            raise ValueError(f"DraftLength: `longest` must be an integer >= 1, got {longest!r}")
        self.longest, self.start = longest, min(start, longest)
        self.warmup, self.skip = warmup, skip
        self.rounds: dict[int, int] = {}  # rounds run per length
        self.seconds: dict[int, float] = {}  # timed seconds per length
        self.timed: dict[int, int] = {}  # timed rounds per length
        self.accepted = self.tested = 0

    def next(self) -> int:
        """The next round's draft length."""
        for drafts in (self.start, 0):
            if self.rounds.get(drafts, 0) < self.skip + self.warmup:
                return drafts
        return self.best()

    def record(self, drafts: int, seconds: float, accepted: int, all_accepted: int, rows: int) -> None:
        """One round: its length, wall time, accepted drafts summed over its rows, rows that accepted all, rows."""
        done = self.rounds.get(drafts, 0)
        self.rounds[drafts] = done + 1
        if done >= self.skip:
            self.seconds[drafts] = self.seconds.get(drafts, 0.0) + seconds
            self.timed[drafts] = self.timed.get(drafts, 0) + 1
        if drafts and rows:
            self.accepted += accepted
            self.tested += accepted + rows - all_accepted

    def acceptance(self) -> float:
        """The measured acceptance rate of draft tokens (0 before any was tested)."""
        return self.accepted / self.tested if self.tested else 0.0

    def best(self) -> int:
        """The length maximising the modelled tokens per second (``start`` until both kinds are timed)."""
        mean = {drafts: self.seconds[drafts] / self.timed[drafts] for drafts in self.timed}
        if 0 not in mean or len(mean) < 2:
            return self.start
        plain = mean[0]
        slopes = [((mean[g] - plain) / g, self.timed[g]) for g in mean if g]
        slope = max(sum(s * n for s, n in slopes) / sum(n for _, n in slopes), 1e-9)
        rate = {g: expected_tokens(self.acceptance(), g) / (plain + g * slope) for g in range(self.longest + 1)}
        return max(rate, key=rate.get)
