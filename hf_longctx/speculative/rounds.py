"""Self-speculation rounds on static buffers, replayed as CUDA graphs: ``StaticRounds``
(``Speculative(draft="self", cuda_graphs=True)``).

A round runs on the device from start to end, with no host read inside it:

1. draft: G one-token static steps of the target through the draft view (``LongCtxLayer`` static decoding), each
   token chosen after generate's logits processors (greedy: the argmax; sampling: drawn from q,
   ``verify.sample_from``);
2. verify: the draft steps are undone (``LongCtxLayer.rewind_static``) and the round's G + 1 tokens written again as
   one static block at the same slots (``begin_block``), attended causally at their own slots (the kernel's
   ``q_start``);
3. accept: ``verify.greedy_accept`` or ``verify.sample_accept`` per row; the block's rejected slots become holes
   (``accept_block``): every row moves on by its own count, the device counter by G + 1;
4. emit: each active row appends its accepted drafts and the round's last token to its output, up to EOS or its
   length limit (``sequences.emitted``).

On CUDA each (draft length, buffer addresses) gets one graph, captured after an eager warm-up round and replayed
from then on; the host advances its mirrors of the counters and reads one small vector a round (rows still active,
and the round's acceptance per draft position: ``RoundStatus``). On CPU the same rounds run eagerly. G = 0 is a
plain decoding step: the one-token static step ``lc.graph_generate`` replays, its token emitted on the device.

What the frame costs: every round takes G + 1 slots whatever it accepts (the holes are read as masked keys), and
the buffers grow (the graphs are then captured again) when the slots run out. What it needs
(:func:`unsupported_reason`): a ``LongCtxCache`` without eviction whose layers are all full attention; logits
processors that ignore the ids (temperature, top-k, top-p); max-length and EOS stopping only; no streamer; on CUDA
G + 1 query rows the kernel's decode path takes. ``speculative_generate`` otherwise runs its eager rounds and says
why.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
from transformers import PreTrainedModel
from transformers.generation import EosTokenCriteria, LogitsProcessorList, MaxLengthCriteria, StoppingCriteriaList

from ..attention.kv import moves_sinks, static_rule
from ..cache import LongCtxCache, LongCtxLayer
from ..cache.graphs import capture, warm_up
from ..config import SinkAttention, Speculative
from .sequences import IDS_FREE, emitted
from .verify import greedy_accept, sample_accept, sample_from


def kernel_takes(model: PreTrainedModel, rows: int) -> bool:
    """Whether the attention kernel's decode path takes ``rows`` query rows with holes in the mask on this model
    (``sink_window.takes_holes``); always off CUDA, where the reference runs."""
    if model.device.type != "cuda":
        return True
    from ..kernels import sink_window

    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    return sink_window.takes_holes(rows, heads // (getattr(config, "num_key_value_heads", None) or heads))


def most_drafts(model: PreTrainedModel, speculative: Speculative) -> int:
    """The most draft tokens a round will have: the fixed length, or with ``"adaptive"`` ``max_draft_tokens``
    capped by the verification rows the kernel takes (0 when it takes none)."""
    if speculative.num_draft_tokens != "adaptive":
        return speculative.num_draft_tokens
    return max((g for g in range(speculative.max_draft_tokens + 1) if kernel_takes(model, g + 1)), default=0)


def unsupported_reason(model: PreTrainedModel, cache: LongCtxCache, full_attention: bool, drafts: int,
                       processors: LogitsProcessorList, stopping: StoppingCriteriaList, streamer) -> str | None:
    """Why this call cannot run ``StaticRounds`` of up to ``drafts`` draft tokens (None: it can);
    ``full_attention``: whether every layer of the model and cache is full attention."""
    if drafts < 1 or not kernel_takes(model, drafts + 1):
        return f"{drafts + 1} verification rows per key/value head exceed the attention kernel's decode path"
    if not all(isinstance(layer, LongCtxLayer) for layer in cache.layers):
        return "a cache layer is not a LongCtxLayer (build the cache with LongCtxCache(model, cuda_graphs=True))"
    if not full_attention:
        return "a layer is not full attention (rows cannot advance by their own counts)"
    if streamer is not None:
        return "a streamer is given"
    for processor in processors:
        if not isinstance(processor, IDS_FREE):
            return (f"the logits processor {type(processor).__name__} reads the ids (only "
                    f"{[kind.__name__ for kind in IDS_FREE]})")
    for criterion in stopping:
        if not isinstance(criterion, (MaxLengthCriteria, EosTokenCriteria)):
            return f"the stopping criterion {type(criterion).__name__} (only max length and EOS)"
    if not any(isinstance(criterion, MaxLengthCriteria) for criterion in stopping):
        return "no max length"
    if moves_sinks(static_rule(model.config.get_text_config(decoder=True), None)):
        return "the patched sink rule moves its sinks (positions='cache' or distance_limit)"
    return None


class RoundStatus(NamedTuple):
    """What the host reads after a round (one transfer)."""

    active: int  # rows still going on after it
    rows: int  # rows that took part
    reached: list[int]  # reached[j - 1]: rows of them that accepted at least j drafts (j = 1..drafts)
    steady: bool  # replayed, or eager by design (no graphs): no warm-up or capture in its time

    @property
    def accepted(self) -> int:
        """Accepted drafts summed over the rows that took part."""
        return sum(self.reached)


class StaticRounds:
    """The state and rounds of one self-speculative ``generate`` call (module docstring).

    Args:
        model: the target, running ``longctx_kv``; cache: its prefilled ``LongCtxCache``.
        view: the draft view (sinks + window over the stored slots).
        processors: generate's logits processors (ids-free); do_sample: sample (else greedy).
        input_ids: (B, P) int64 prompt, left-padded; attention_mask: (B, P) or None.
        room: the most tokens a row emits; eos: (E,) int64 EOS ids or None; pad: the pad id for finished rows.
        longest: the most draft tokens a round will have.
        graphs: capture and replay CUDA graphs (on CUDA); False runs every round eagerly.
    """

    def __init__(self, model: PreTrainedModel, cache: LongCtxCache, view: SinkAttention,
                 processors: LogitsProcessorList, do_sample: bool, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None, room: int, eos: torch.Tensor | None, pad: int | None,
                 longest: int, graphs: bool = True):
        self.model, self.cache, self.view = model, cache, view
        self.layers: list[LongCtxLayer] = list(cache.layers)
        self.processors, self.do_sample = processors, do_sample
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.room, self.eos = room, eos
        device, batch = input_ids.device, input_ids.shape[0]
        self.device = device
        self.graphs = graphs and device.type == "cuda"
        self.out = input_ids.new_full((batch, room + 1), 0 if pad is None else pad)  # the last column: not emitted
        self.counts = input_ids.new_zeros(batch)
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        self.token = input_ids.new_zeros(batch)  # the round's first token (not in the cache yet)
        self.position = input_ids.new_zeros(batch)  # its position id
        self.status = input_ids.new_zeros(2 + longest)  # RoundStatus: active, rows, reached (as many as drafts)
        self.cache_position = None
        if "cache_position" in inspect.signature(model.base_model.forward).parameters:  # transformers 5.17
            self.cache_position = input_ids.new_zeros(longest + 1)
        self.captured: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._warm: tuple | None = None
        self._pool = None
        self.replays = self.captures = self.eager_rounds = 0

    # ------------------------------------------------------------------------------------------ the call
    @torch.no_grad()
    def start(self, logits: torch.Tensor, reserve: int) -> int:
        """Enter static decoding and emit the first token from the prefill's ``logits`` ((B, V) float32).

        Args:
            reserve: slots to size the buffers for now (more are added when they run out).
        Returns:
            whether a row goes on (one host read).
        """
        padded = self.attention_mask is not None and not bool(self.attention_mask.all())
        for layer in self.layers:
            layer.set_static(True, self.attention_mask if padded else None)
            layer.reserve_static(reserve)
            layer.expect_holes()
        mask = self.attention_mask
        real = mask.long().sum(-1) if mask is not None else torch.full_like(self.counts, self.input_ids.shape[1])
        token, _ = self._choose(self._process(logits))
        self._emit(token[:, None], torch.ones_like(token[:, None], dtype=torch.bool))
        self.token.copy_(token)
        self.position.copy_(real)
        return int(self.active.any())

    def stop(self) -> None:
        """Leave static decoding (the cache is usable as before) and free the graphs."""
        self.captured, self._warm = {}, None
        for layer in self.layers:
            layer.set_view(None)
            layer.block = 0
            layer.set_static(False)

    def output(self) -> torch.Tensor:
        """(B, P + the most tokens a row emitted) int64 sequences, shorter rows padded."""
        return torch.cat([self.input_ids, self.out[:, : int(self.counts.max())]], dim=1)

    @torch.no_grad()
    def run(self, drafts: int) -> RoundStatus:
        """One round with ``drafts`` draft tokens: replayed (captured first, after an eager warm-up) or eager.

        Returns:
            the round's ``RoundStatus`` (one host read).
        """
        self._make_room(drafts)
        if self.cache_position is not None:
            stored = self.layers[0].stored_length
            torch.arange(stored, stored + drafts + 1, out=self.cache_position[: drafts + 1])
        signature = (drafts, *(layer.static_signature() for layer in self.layers))
        graph = self.captured.get(signature)
        steady = not self.graphs or graph is not None
        if not self.graphs:
            self._round(drafts)
            self.eager_rounds += 1
        elif graph is None and signature != self._warm:  # new addresses or length: warm up eagerly, capture next
            self._warm = signature
            warm_up(self.device, lambda: self._round(drafts))
            self.eager_rounds += 1
        else:
            if graph is None:
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                graph = self.captured[signature] = capture(self.layers, lambda: self._round(drafts), self._pool)
                self.captures += 1
            graph.replay()
            for layer in self.layers:
                layer.advance_block(drafts + 1)
            self.replays += 1
        active, rows, *reached = self.status[: 2 + drafts].tolist()
        return RoundStatus(active, rows, reached, steady)

    # ---------------------------------------------------------------------------------------- internals
    def _make_room(self, drafts: int) -> None:
        """Grow the buffers (they move: the graphs go) unless a round of ``drafts`` drafts fits."""
        layer = self.layers[0]
        if layer.stored_length + drafts + 2 <= layer.capacity:
            return
        self.captured, self._warm = {}, None
        for layer in self.layers:
            layer.reserve_static(max(drafts + 2, layer.stored_length))

    def _round(self, drafts: int) -> None:
        """The round's device work (module docstring); the tensors it keeps are the buffers of ``__init__``."""
        if drafts == 0:
            self._plain_step()
            return
        batch = self.token.shape[0]
        tokens, probs, ids = [], [], self.token[:, None]
        for layer in self.layers:
            layer.set_view(self.view)
        for step in range(drafts):
            token, q = self._choose(self._process(self._forward(ids, self.position[:, None] + step, step)[:, 0]))
            tokens.append(token)
            probs.append(q)
            ids = token[:, None]
        for layer in self.layers:
            layer.set_view(None)
            layer.rewind_static(drafts)
            layer.begin_block(drafts + 1)
        drafted = torch.stack(tokens, dim=1) if tokens else self.token.new_zeros(batch, 0)
        offsets = torch.arange(drafts + 1, device=self.device)
        logits = self._forward(torch.cat([self.token[:, None], drafted], dim=1), self.position[:, None] + offsets, 0)
        scores = self._process(logits.flatten(0, 1)).view(batch, drafts + 1, -1)
        if self.do_sample:
            q = torch.stack(probs, dim=1) if probs else scores.new_zeros(batch, 0, scores.shape[-1])
            accepted, next_token = sample_accept(drafted, q, torch.softmax(scores, dim=-1))
        else:
            accepted, next_token = greedy_accept(drafted, scores)
        for layer in self.layers:
            layer.accept_block(accepted)
        columns = torch.cat([drafted, next_token[:, None]], dim=1).scatter(1, accepted[:, None], next_token[:, None])
        rows = self.active.clone()
        self._emit(columns, offsets <= accepted[:, None])
        self.token.copy_(next_token)
        self.position.add_(accepted + 1)
        reached = ((accepted[:, None] > offsets[:drafts]) & rows[:, None]).sum(dim=0)
        self.status[: 2 + drafts].copy_(torch.cat([torch.stack([self.active.sum(), rows.sum()]), reached]))

    def _plain_step(self) -> None:
        """A round without drafts: the one-token static step plain decoding replays (no block to accept), its token
        emitted."""
        logits = self._forward(self.token[:, None], self.position[:, None], 0)[:, 0]
        token, _ = self._choose(self._process(logits))
        rows = self.active.clone()
        self._emit(token[:, None], torch.ones_like(rows)[:, None])
        self.token.copy_(token)
        self.position.add_(1)
        self.status[:2].copy_(torch.stack([self.active.sum(), rows.sum()]))

    def _emit(self, columns: torch.Tensor, real: torch.Tensor) -> None:
        """Append each active row's ``real`` columns ((B, k) int64 tokens, (B, k) bool) to its output."""
        emits, stopped = emitted(columns, self.active[:, None] & real, self.counts, self.room, self.eos)
        index = torch.where(emits, self.counts[:, None] + emits.long().cumsum(dim=1) - 1, self.room)
        self.out.scatter_(1, index, columns)
        self.counts.add_(emits.long().sum(dim=1))
        self.active &= ~stopped

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, first: int) -> torch.Tensor:
        """(B, T, V) float32 logits of ``ids`` ((B, T) at ``positions``), the T-th static write from ``first``."""
        extra = {}
        if self.cache_position is not None:
            extra["cache_position"] = self.cache_position[first: first + ids.shape[1]]
        out = self.model(input_ids=ids, position_ids=positions, past_key_values=self.cache, use_cache=True,
                         logits_to_keep=ids.shape[1], **extra)
        return out.logits.float()

    def _process(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, V) scores after the (ids-free) logits processors."""
        if len(self.processors) == 0:
            return logits
        return self.processors(self.input_ids[:1].expand(logits.shape[0], -1), logits)

    def _choose(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """((N,) int64 tokens, (N, V) float32 q they were drawn from, None when greedy)."""
        if not self.do_sample:
            return scores.argmax(-1), None
        q = torch.softmax(scores, dim=-1)
        return sample_from(q), q
