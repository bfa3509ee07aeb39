"""Drafters: what proposes the tokens the target verifies.

- ``DraftModel``: a separate small model of the target's vocabulary, with its own (optionally evicting) cache.
- ``SelfDraft``: the target itself, attending through a sink + window view of its own ``LongCtxCache``
  (no second cache, no second prefill); the drafted tokens' keys and values are cropped afterwards (a pointer
  move) and the verification pass writes the exact ones.

Both draft with the same loop (``Drafter.propose``): one forward per token, after generate's logits
processors, greedy or sampled, stopping early under an adaptive confidence threshold.
"""

from __future__ import annotations

import dataclasses

import torch
import transformers
from packaging import version
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.cache_utils import DynamicSlidingWindowLayer
from transformers.generation import LogitsProcessorList

from ..cache import GraphDecoder, LongCtxCache, LongCtxLayer
from ..config import SinkAttention, Speculative
from .forward import forward_unseen
from .sequences import Sequences

# Before 5.23 (seen on 5.17) a past-recording DynamicSlidingWindowLayer returns more keys than the mask announces
# when several forwards run without a crop between them, as drafting does.
_SLIDING_LAYERS_DRAFT = version.parse(transformers.__version__) >= version.parse("5.23")


class Drafter:
    """The drafting loop shared by the drafters.

    Args:
        model: the model that drafts; cache: the cache it drafts with.
        speculative: the feature (draft length, adaptive threshold).
    """

    def __init__(self, model: PreTrainedModel, cache: LongCtxCache, speculative: Speculative):
        self.model, self.cache, self.speculative = model, cache, speculative

    def prefill(self, sequences: Sequences) -> None:
        """Prepare drafting once the target has run the prompt ``sequences`` (nothing to do here)."""

    def close(self) -> None:
        """Release what ``prefill`` set up, after the last round (nothing here)."""

    def max_tokens(self) -> int:
        """The most tokens one round drafts."""
        spec = self.speculative
        return spec.max_draft_tokens if spec.num_draft_tokens == "adaptive" else spec.num_draft_tokens

    @torch.no_grad()
    def propose(
        self,
        sequences: Sequences,
        limit: int,
        logits_processor: LogitsProcessorList,
        do_sample: bool,
        active: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft up to ``limit`` tokens after each row's slots, each after the logits processors generate applies.

        Greedy drafts take the argmax; sampled drafts are drawn from q = softmax(processed scores). With
        ``num_draft_tokens="adaptive"`` drafting stops once the probability q gives its token falls under
        ``threshold`` in every active row (that token is still proposed).

        Args:
            sequences: the batch so far (its last slot is not in the caches yet).
            limit: the most tokens to draft (>= 1).
            active: (B,) bool rows still generating (only they decide an adaptive stop).
        Returns:
            (tokens, q): (B, G) int64 drafted tokens and (B, G, V) float32 the distributions they were drawn
            from, G <= limit.
        """
        batch = sequences.slots.shape[0]
        tokens = sequences.slots.new_zeros(batch, 0)
        probs = []
        adaptive = self.speculative.num_draft_tokens == "adaptive"
        for _ in range(limit):
            logits = self.step(*sequences.with_drafts(tokens))
            q = torch.softmax(sequences.process(logits_processor, logits, tokens), dim=-1)
            token = torch.multinomial(q, 1, generator=generator)[:, 0] if do_sample else q.argmax(-1)
            tokens = torch.cat([tokens, token[:, None]], dim=1)
            probs.append(q)
            confidence = q.gather(-1, token[:, None])[:, 0]
            if adaptive and not bool(((confidence >= self.speculative.threshold) & active).any()):
                break
        return tokens, torch.stack(probs, dim=1)

    def step(self, slots: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, V) float32 next-token logits after ``slots`` ((B, T) with their (B, T) padding mask)."""
        return forward_unseen(self.model, self.cache, slots, mask, keep=1)[:, 0]

    def plain_logits(self, target: PreTrainedModel, cache: LongCtxCache, sequences: Sequences) -> torch.Tensor:
        """(B, 1, V) float32: the target's next-token logits after the slots, as plain decoding computes them
        (a round without drafts); here one eager forward of the target over its ``cache``."""
        return forward_unseen(target, cache, sequences.slots, sequences.mask, keep=1)


class DraftModel(Drafter):
    """Drafts tokens with a small model of the target's vocabulary.

    Its cache is a ``LongCtxCache`` bounded by ``speculative.draft_kv`` (the draft model must then run the
    ``longctx_kv`` attention: ``lc.patch(draft, kv=...)``); after the prefill it records the past, so that
    rejected tokens can be cropped and evictions wait for the crop. Before transformers 5.23 its sliding-window
    layers are non-evicting ``LongCtxLayer``s (the mask still applies the window; the tokens are the same).

    Args:
        model: the draft model.
        speculative: the feature (draft length, adaptive threshold, draft_kv).
        vocab_size: the target's output vocabulary size V.
    Raises:
        ValueError: the draft's vocabulary size differs from the target's.
    """

    def __init__(self, model: PreTrainedModel, speculative: Speculative, vocab_size: int):
        draft_vocab = model.get_output_embeddings().weight.shape[0]
        if draft_vocab != vocab_size:
            raise ValueError(
                f"Speculative: `draft` vocabulary size ({draft_vocab}) differs from the target's ({vocab_size}); "
                "the draft must share the target's tokenizer"
            )
        super().__init__(model, LongCtxCache(model, kv=speculative.draft_kv), speculative)
        if not _SLIDING_LAYERS_DRAFT:
            for index, layer in enumerate(self.cache.layers):
                if isinstance(layer, DynamicSlidingWindowLayer):
                    self.cache.layers[index] = LongCtxLayer(layer_idx=index)

    @torch.no_grad()
    def prefill(self, sequences: Sequences) -> None:
        """Run the draft over the prompt, then start recording the past."""
        forward_unseen(self.model, self.cache, sequences.slots, sequences.mask, keep=1)
        self.cache.activate_past_recording()

    def rollback(self, length: int, holes: torch.Tensor, start: int) -> None:
        """Mark the round's holes ((B, k) bool from logical token ``start``), forget every token from ``length``
        on (a pointer move), then run a deferred eviction."""
        self.cache.mark_holes(holes, start)
        self.cache.crop(min(0, length - self.cache.get_seq_length()))


class SelfDraft(Drafter):
    """Self-speculation: the target drafts through a sink + window view of its own ``LongCtxCache``.

    While drafting, the cache's full-attention layers attend to their first ``sink_tokens`` stored slots and the
    last ``window`` ones (``LongCtxLayer.set_view``, applied by the ``longctx_kv`` attention function, whose
    kernel reads only those slots); other layers (e.g. sliding-window ones) run as they are. The K/V the draft
    forwards write are cropped when drafting ends, so the verification pass writes the target's exact ones.

    With ``speculative.cuda_graphs`` the one-token draft steps are the static steps of a ``GraphDecoder``
    (replayed as a CUDA graph on CUDA, run eagerly on CPU): the cache enters static decoding after the prefill and
    stays in it through the verification passes (eager multi-token writes that set the device counter, as crops
    do), so one captured step serves every round. The cache must not evict.

    Args:
        model: the target (running ``longctx_kv``); cache: its ``LongCtxCache``, recording the past.
        speculative: the feature; its ``draft_kv`` (``streaming`` with a budget) sets the view.
    Raises:
        ValueError: ``cuda_graphs`` over a cache that evicts.
    """

    def __init__(self, model: PreTrainedModel, cache: LongCtxCache, speculative: Speculative):
        super().__init__(model, cache, speculative)
        self.view = draft_view(speculative, cache)
        self.decoder: GraphDecoder | None = None

    def prefill(self, sequences: Sequences) -> None:
        """With ``cuda_graphs``: put the (prefilled) cache in static decoding for the draft steps."""
        if not self.speculative.cuda_graphs:
            return
        self.decoder = GraphDecoder(self.model, self.cache)
        padded = not bool(sequences.mask.all())
        self.decoder.start(self.max_tokens() + 2, padding=sequences.mask if padded else None)

    def close(self) -> None:
        """Leave static decoding (the cache is usable as before)."""
        if self.decoder is not None:
            self.decoder.stop()
            self.decoder = None

    def step(self, slots: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``Drafter.step``; one new token with ``cuda_graphs`` is a static step (its logits are the decoder's
        buffer, overwritten by the next step)."""
        if self.decoder is None or slots.shape[1] - self.cache.get_seq_length() != 1:
            return super().step(slots, mask)
        return self.decoder.step(slots[:, -1], mask.sum(-1) - 1)

    def plain_logits(self, target: PreTrainedModel, cache: LongCtxCache, sequences: Sequences) -> torch.Tensor:
        """``Drafter.plain_logits`` through ``step`` (the target over its own cache, no view set): with
        ``cuda_graphs`` a static step, replayed from its own captured graph."""
        if self.decoder is not None:
            self.decoder.reserve(2)
        return self.step(sequences.slots, sequences.mask)[:, None]

    @torch.no_grad()
    def propose(self, sequences: Sequences, limit: int, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """``Drafter.propose`` through the view; the cache is back at its length before drafting afterwards."""
        seen = self.cache.get_seq_length()
        if self.decoder is not None:
            self.decoder.reserve(limit + 2)  # the drafts, then the verification's G + 1 tokens and a spare slot
        self.cache.set_view(self.view)
        try:
            return super().propose(sequences, limit, *args, **kwargs)
        finally:
            self.cache.set_view(None)
            self.cache.crop(seen - self.cache.get_seq_length())


def draft_view(speculative: Speculative, cache: LongCtxCache) -> SinkAttention:
    """The sink + window rule self-speculation drafts through (from ``speculative.self_view``).

    Raises:
        ValueError: ``cuda_graphs`` over a cache that evicts.
    """
    if speculative.cuda_graphs and cache.kv is not None:
        raise ValueError(f"Speculative: `cuda_graphs` needs a LongCtxCache without eviction (kv=None), got kv="
                         f"{cache.kv!r}")
    kv = speculative.self_view
    return SinkAttention(sink_tokens=kv.sink_tokens, window=kv.budget - kv.sink_tokens)


def load_draft(speculative: Speculative, target: PreTrainedModel) -> Speculative:
    """``speculative`` with its draft as a model: a name or path is loaded (the target's dtype and device);
    ``"self"`` and a model are returned as they are."""
    if isinstance(speculative.draft, str) and speculative.draft != "self":
        draft = AutoModelForCausalLM.from_pretrained(speculative.draft, dtype=target.dtype).to(target.device).eval()
        return dataclasses.replace(speculative, draft=draft)
    return speculative
