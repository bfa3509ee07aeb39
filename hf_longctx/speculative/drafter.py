"""A separate draft model proposing tokens for the target to verify, with its own (optionally evicting) cache."""

from __future__ import annotations

import torch
import dataclasses

import transformers
from packaging import version
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.cache_utils import DynamicSlidingWindowLayer
from transformers.generation import LogitsProcessorList

from ..cache import LongCtxCache, LongCtxLayer
from ..config import Speculative
from .forward import forward_unseen

# Before 5.23 (seen on 5.17) a past-recording DynamicSlidingWindowLayer returns more keys than the mask announces
# when several forwards run without a crop between them, as drafting does.
_SLIDING_LAYERS_DRAFT = version.parse(transformers.__version__) >= version.parse("5.23")


class DraftModel:
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
        self.model = model
        self.speculative = speculative
        self.cache = LongCtxCache(model, kv=speculative.draft_kv)
        if not _SLIDING_LAYERS_DRAFT:
            for index, layer in enumerate(self.cache.layers):
                if isinstance(layer, DynamicSlidingWindowLayer):
                    self.cache.layers[index] = LongCtxLayer(layer_idx=index)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Run the draft over the prompt ((B, S) ids and padding mask or None), then start recording the past."""
        forward_unseen(self.model, self.cache, input_ids, attention_mask, keep=1)
        self.cache.activate_past_recording()

    def max_tokens(self) -> int:
        """The most tokens one round drafts."""
        spec = self.speculative
        return spec.max_draft_tokens if spec.num_draft_tokens == "adaptive" else spec.num_draft_tokens

    @torch.no_grad()
    def propose(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        limit: int,
        logits_processor: LogitsProcessorList,
        do_sample: bool,
        active: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft up to ``limit`` tokens after ``input_ids``, each after the logits processors generate applies.

        Greedy drafts take the argmax; sampled drafts are drawn from q = softmax(processed scores). With
        ``num_draft_tokens="adaptive"`` drafting stops once the probability q gives its token falls under
        ``threshold`` in every active row (that token is still proposed).

        Args:
            input_ids: (B, S) int64 the sequence so far; attention_mask: its (B, S) padding mask or None.
            limit: the most tokens to draft (>= 1).
            active: (B,) bool rows still generating (only they decide an adaptive stop).
        Returns:
            (tokens, q): (B, G) int64 drafted tokens and (B, G, V) float32 the distributions they were drawn
            from, G <= limit.
        """
        tokens, probs = [], []
        adaptive = self.speculative.num_draft_tokens == "adaptive"
        for _ in range(limit):
            logits = forward_unseen(self.model, self.cache, input_ids, attention_mask, keep=1)[:, 0]
            q = torch.softmax(logits_processor(input_ids, logits), dim=-1)
            token = torch.multinomial(q, 1, generator=generator)[:, 0] if do_sample else q.argmax(-1)
            tokens.append(token)
            probs.append(q)
            input_ids = torch.cat([input_ids, token[:, None]], dim=1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1)
            confidence = q.gather(-1, token[:, None])[:, 0]
            if adaptive and bool((confidence[active] < self.speculative.threshold).all()):
                break
        return torch.stack(tokens, dim=1), torch.stack(probs, dim=1)

    def rollback(self, length: int) -> None:
        """Forget every token from position ``length`` on (a pointer move), then run a deferred eviction."""
        self.cache.crop(min(0, length - self.cache.get_seq_length()))


def load_draft(speculative: Speculative, target: PreTrainedModel) -> Speculative:
    """``speculative`` with its draft as a model: a name or path is loaded (the target's dtype and device).

    Raises:
        ValueError: ``draft="self"`` (self-speculation is not built yet).
    """
    if speculative.draft == "self":
        raise ValueError(
            "Speculative: draft='self' (self-speculation) is not built yet; give a draft model: "
            "lc.Speculative(draft=draft_model) or draft='org/name'"
        )
    if isinstance(speculative.draft, str):
        draft = AutoModelForCausalLM.from_pretrained(speculative.draft, dtype=target.dtype).to(target.device).eval()
        return dataclasses.replace(speculative, draft=draft)
    return speculative
