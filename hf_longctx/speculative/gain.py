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
    chosen on the host to maximise the modelled tokens per row per second E(G) / t(G), from what the call measured;
    no device read inside a round.

    - Acceptance, pooled over every round whatever its length: a_j = the row-rounds that accepted their j-th draft
      over those that drafted it with its j - 1 predecessors accepted; E(G) = 1 + sum_{j <= G} prod_{i <= j} a_i
      tokens a round (positions no round has drafted yet take the rate of the last one drafted). Pooled over the
      rows too, so at batch > 1 it models the mean row. A length's own tokens per round over a handful of rounds
      are too noisy to rank lengths 5-10% apart; the pooled rates settle within a few rounds.
    - Cost: t(G), the mean wall time of the length's ``steady`` rounds (graph replays: a round that warms up or
      captures is not timed), each timed from the previous round's host read to its own, so that the host's work
      between rounds counts; a length with fewer than ``warmup`` of them gets the straight line through the two
      timed lengths nearest it.
    - Order: ``start`` first (its rounds measure the acceptance up to it), then G = 0 (plain steps: the cost line's
      second point), then the model's best length; one not timed yet runs until it is (each length costs one eager
      warm-up round and one capture), and the choice is made again once it is, and every ``refresh`` rounds (the
      rule's own host time is a few per cent of a replayed round at batch 1). G = 0 switches speculation
      off, and its rounds measure no acceptance: so it is a candidate only once ``min_trials`` row-rounds have
      drafted (at batch 1 a handful of rounds' acceptance would often switch speculation off for good by chance).

    Args:
        longest: the most drafts a round may have (>= 1); start: the first length (capped by ``longest``);
        warmup: steady rounds that time a length; min_trials: row-rounds drafted before G = 0 may be chosen;
        refresh: rounds a timed choice is kept before the choice is made again.
    Raises:
        ValueError: ``longest`` < 1.
    """

    def __init__(self, longest: int, start: int = 3, warmup: int = 5, min_trials: int = 64, refresh: int = 16):
        if isinstance(longest, bool) or not isinstance(longest, int) or longest < 1:
            raise ValueError(f"DraftLength: `longest` must be an integer >= 1, got {longest!r}")
        self.longest, self.warmup, self.min_trials, self.refresh = longest, warmup, min_trials, refresh
        self.current = min(start, longest)
        self.kept = -1  # rounds since the choice was made, once its length is timed (-1: to be made)
        self.steady: dict[int, int] = {}  # timed rounds per length
        self.seconds: dict[int, float] = {}  # their summed wall time
        self.drafted = [0] * longest  # per draft position j - 1: row-rounds that drafted it after j - 1 accepted
        self.accepted = [0] * longest  # ... and accepted it

    def next(self) -> int:
        """The next round's draft length."""
        if not self.timed(self.current):
            return self.current
        if not self.timed(0):
            self.current = 0
        elif 0 <= self.kept < self.refresh:
            self.kept += 1
        else:
            shortest = 0 if self.drafted[0] >= self.min_trials else 1
            self.current = max(range(shortest, self.longest + 1),
                               key=lambda g: self.expected_tokens(g) / self.cost(g))
            self.kept = 0 if self.timed(self.current) else -1
        return self.current

    def record(self, drafts: int, seconds: float, rows: int, reached: list[int], steady: bool) -> None:
        """One round: its length, wall time (s), the rows that took part, ``reached[j - 1]`` = those of them that
        accepted at least j drafts (j = 1..drafts), and whether it was a replay (``steady``: no one-time work)."""
        trials = rows
        for position, count in enumerate(reached[:drafts]):
            self.drafted[position] += trials
            self.accepted[position] += count
            trials = count
        if steady:
            self.steady[drafts] = self.steady.get(drafts, 0) + 1
            self.seconds[drafts] = self.seconds.get(drafts, 0.0) + seconds

    def timed(self, drafts: int) -> bool:
        """Whether ``drafts``' cost is measured (``warmup`` steady rounds)."""
        return self.steady.get(drafts, 0) >= self.warmup

    def expected_tokens(self, drafts: int) -> float:
        """E(G): tokens a row emits in a round of ``drafts`` drafts under the pooled acceptance rates."""
        expected, survive, rate = 1.0, 1.0, 0.0
        for position in range(drafts):
            if self.drafted[position]:
                rate = self.accepted[position] / self.drafted[position]
            survive *= rate
            expected += survive
        return expected

    def cost(self, drafts: int) -> float:
        """t(G) in seconds: measured, or on the line through the two timed lengths nearest ``drafts``."""
        timed = sorted(g for g in self.steady if self.timed(g))
        if drafts in timed:
            return self.seconds[drafts] / self.steady[drafts]
        below, above = [g for g in timed if g < drafts], [g for g in timed if g > drafts]
        if below and above:
            near = (below[-1], above[0])
        else:
            near = tuple(sorted(timed, key=lambda g: abs(g - drafts))[:2])
        (g0, g1), (t0, t1) = near, (self.cost(g) for g in near)
        return max(t0 + (t1 - t0) * (drafts - g0) / (g1 - g0), 1e-9)
