"""The batch's token slots during speculative decoding, with per-row progress and no re-padding.

Every round appends the same number of columns ("slots") to every row: the accepted draft tokens of the row
that accepted most, then the round's last token (the target's correction or bonus token). A row that
accepted fewer drafts leaves the rest of its draft columns as holes: their padding-mask entry is 0 (so no
later query attends to them, and position ids, counted over the mask, skip them) and they are not part of the
row's sequence. Each row thus advances by its own accepted count, the caches keep one shared slot layout
(a hole is to them what left padding is), and nothing is copied to re-align rows.

Shapes: B rows, P prompt columns (left padding included), T slots so far, V vocabulary.
"""

from __future__ import annotations

import torch
from transformers.generation import (
    EosTokenCriteria,
    LogitsProcessorList,
    MaxLengthCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

# Processors whose output does not depend on the ids they are given: applied once for the whole batch.
IDS_FREE = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)


class Sequences:
    """The slots of a batch and each row's sequence (as plain ``generate`` would hold it).

    Args:
        input_ids: (B, P) int64 prompt, left-padded.
        attention_mask: (B, P) its padding mask, or None (no padding).
    Attributes:
        slots: (B, T) int64 token of every slot (holes keep their rejected draft token).
        mask: (B, T) int64 padding mask of the slots: 0 for left padding and holes.
        member: (B, T) bool slots in the row's sequence: the prompt (its padding included) and emitted tokens.
        counts: (B,) int64 tokens emitted per row.
    """

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        self.slots = input_ids
        self.mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        self.member = torch.ones_like(input_ids, dtype=torch.bool)
        self.prompt = input_ids.shape[1]
        self.counts = input_ids.new_zeros(input_ids.shape[0])

    @property
    def length(self) -> int:
        """T: slots so far (the caches have seen all but the last)."""
        return self.slots.shape[1]

    def with_drafts(self, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots, mask) followed by the (B, G) draft tokens as real tokens."""
        return torch.cat([self.slots, drafts], dim=1), torch.cat([self.mask, torch.ones_like(drafts)], dim=1)

    def sequences(self) -> torch.Tensor:
        """(B, P + max count) int64: each row's sequence first (prompt and emitted tokens), then leftovers."""
        order = torch.argsort((~self.member).to(torch.int8), dim=1, stable=True)
        return self.slots.gather(1, order)[:, : self.prompt + int(self.counts.max())]

    def output(self, pad: torch.Tensor | None) -> torch.Tensor:
        """The generated sequences: (B, P + max count), rows that emitted fewer tokens padded with ``pad``."""
        out = self.sequences()
        short = torch.arange(out.shape[1], device=out.device) >= self.prompt + self.counts[:, None]
        return out if pad is None else out.masked_fill(short, pad)

    def process(self, processor: LogitsProcessorList, logits: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        """Apply generate's logits processors to the next-token logits after each row's sequence + ``drafts``.

        Args:
            logits: (B, V) float32 raw next-token logits.
            drafts: (B, j) int64 draft tokens following each row's sequence.
        Returns:
            (B, V) processed scores; rows of different lengths are processed in groups of equal length.
        """
        if len(processor) == 0:
            return logits
        if all(isinstance(step, IDS_FREE) for step in processor):
            return processor(self.slots, logits)
        sequences = self.sequences()
        scores = torch.empty_like(logits)
        for count in self.counts.unique().tolist():
            rows = (self.counts == count).nonzero()[:, 0]
            ids = torch.cat([sequences[rows, : self.prompt + count], drafts[rows]], dim=1)
            scores[rows] = processor(ids, logits[rows])
        return scores

    def append(
        self,
        columns: torch.Tensor,
        holes: torch.Tensor,
        active: torch.Tensor,
        stopping: StoppingCriteriaList,
        streamer=None,
    ) -> None:
        """Append a round's columns; each active row emits its non-hole ones in order until it stops.

        Args:
            columns: (B, m + 1) int64 the round's tokens (accepted drafts, then the last token).
            holes: (B, m + 1) bool rejected draft columns of each row.
            active: (B,) bool rows still generating; updated in place as rows stop.
            stopping: generate's stopping criteria (max length and EOS evaluated per row).
            streamer: generate's streamer (batch 1), or None.
        """
        self.slots = torch.cat([self.slots, columns], dim=1)
        self.mask = torch.cat([self.mask, (~holes).long()], dim=1)
        self.member = torch.cat([self.member, torch.zeros_like(holes)], dim=1)
        first = self.length - columns.shape[1]
        if streamer is None and all(isinstance(c, (MaxLengthCriteria, EosTokenCriteria)) for c in stopping):
            self._append_at_once(columns, holes, active, stopping, first)
            return
        for j in range(columns.shape[1]):
            emits = active & ~holes[:, j]
            if not bool(emits.any()):
                continue
            self.member[:, first + j] = emits
            self.counts += emits.long()
            if streamer is not None:
                streamer.put(columns[emits, j].cpu())
            active &= ~(emits & self._finished(stopping, columns[:, j]))

    def _append_at_once(self, columns: torch.Tensor, holes: torch.Tensor, active: torch.Tensor,
                        stopping: StoppingCriteriaList, first: int) -> None:
        """``append``'s column loop without host syncs, for max-length and EOS criteria only."""
        room, eos = stop_rule(stopping, self.prompt)
        emits, stopped = emitted(columns, active[:, None] & ~holes, self.counts, room, eos)
        self.member[:, first:] = emits
        self.counts += emits.long().sum(dim=1)
        active &= ~stopped

    def _finished(self, stopping: StoppingCriteriaList, token: torch.Tensor) -> torch.Tensor:
        """(B,) bool rows whose sequence (ending with ``token``) meets a stopping criterion."""
        done = torch.zeros_like(self.counts, dtype=torch.bool)
        others = StoppingCriteriaList()
        for criterion in stopping:
            if isinstance(criterion, MaxLengthCriteria):
                done |= self.prompt + self.counts >= criterion.max_length
            elif isinstance(criterion, EosTokenCriteria):
                done |= torch.isin(token, criterion.eos_token_id.to(token.device))
            else:
                others.append(criterion)
        if others:
            sequences = self.sequences()
            for count in self.counts.unique().tolist():
                rows = (self.counts == count).nonzero()[:, 0]
                done[rows] |= others(sequences[rows, : self.prompt + count], None)
        return done


def stop_rule(stopping: StoppingCriteriaList, prompt: int) -> tuple[int | None, torch.Tensor | None]:
    """Max-length and EOS criteria (the only ones given) as (the most tokens a row may emit, or None; the (E,) EOS
    ids, or None), for prompts of ``prompt`` columns."""
    room, eos = None, []
    for criterion in stopping:
        if isinstance(criterion, MaxLengthCriteria):
            limit = criterion.max_length - prompt
            room = limit if room is None else min(room, limit)
        else:
            eos.append(criterion.eos_token_id.reshape(-1))
    return room, torch.cat(eos) if eos else None


def emitted(columns: torch.Tensor, candidates: torch.Tensor, counts: torch.Tensor, room: int | None,
            eos: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of a round's tokens each row emits, with no host sync: its candidate columns in order, up to and
    including the first that stops it (an EOS token, or the ``room``-th token of the row).

    Args:
        columns: (B, k) int64 the round's tokens; candidates: (B, k) bool those a row would emit (active rows,
            no holes); counts: (B,) int64 tokens emitted before; room: the most tokens a row emits (None: no
            limit); eos: (E,) int64 EOS ids or None.
    Returns:
        ((B, k) bool emitted columns, (B,) bool rows that stopped).
    """
    stops = torch.zeros_like(candidates)
    if room is not None:
        stops |= counts[:, None] + candidates.long().cumsum(dim=1) >= room
    if eos is not None:
        stops |= torch.isin(columns, eos.to(columns.device))
    stops &= candidates
    emits = candidates & (stops.long().cumsum(dim=1) - stops.long() == 0)  # nothing stopped the row before
    return emits, (stops & emits).any(dim=1)
