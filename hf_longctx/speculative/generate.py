"""``speculative_generate``: the decoding loop that ``model.generate`` runs as its ``custom_generate`` callable.

    out = model.generate(ids, custom_generate=lc.speculative_generate, speculative=lc.Speculative(draft=draft))
    lc.patch(model, speculative=lc.Speculative(draft=draft)); out = model.generate(ids)   # the same

Generate prepares the cache, logits processors and stopping criteria, then calls this loop. Each round the
draft proposes G tokens, the target scores G + 1 positions in one forward over its cache, a verification rule
(``verify``) accepts a prefix, and both caches roll back by cropping (a pointer move in a ``LongCtxCache``).

Batch > 1: every round the batch keeps one accepted length, the minimum over the rows still generating
(``verify.common_acceptance``). That is exact (greedy output equals plain generate; sampling keeps the
target's distribution) and keeps one shared cache length, at the cost of accepting fewer tokens per round
than per-row lengths would.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers.generation import GenerateDecoderOnlyOutput, LogitsProcessorList, StoppingCriteriaList

from ..config import Speculative, parse_feature
from .drafter import DraftModel
from .forward import forward_unseen
from .verify import common_acceptance, greedy_accept, sample_accept

_UNSUPPORTED_OUTPUTS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")


def _feature(speculative: Any) -> Speculative:
    """The Speculative feature of this call, with a loaded draft model."""
    feature = parse_feature("speculative", speculative)
    if feature is None:
        raise ValueError(
            "speculative_generate: no `speculative` feature: pass speculative=lc.Speculative(draft=...) to generate "
            "or patch the model with lc.patch(model, speculative=...)"
        )
    if not isinstance(feature.draft, PreTrainedModel):
        raise ValueError(
            f"Speculative: `draft` {feature.draft!r} is not a loaded model: give the model, or patch the target with "
            "lc.patch(model, speculative=...), which loads a draft given by name"
        )
    return feature


def bind_generate(model: PreTrainedModel, speculative: Speculative) -> types.MethodType:
    """A ``generate`` to bind on the model instance: the class's ``generate`` with
    ``custom_generate=speculative_generate`` and ``speculative`` (draft loaded: ``drafter.load_draft``), unless
    the call asks for another decoding loop (its own ``custom_generate`` or an ``assistant_model``)."""

    def generate(self: PreTrainedModel, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("custom_generate") is None and kwargs.get("assistant_model") is None:
            kwargs["custom_generate"] = speculative_generate
        if kwargs.get("custom_generate") is speculative_generate:
            kwargs.setdefault("speculative", speculative)
        return type(self).generate(self, *args, **kwargs)

    return types.MethodType(generate, model)


def speculative_generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    streamer: Any = None,
    speculative: Speculative | dict | str | None = None,
    **model_kwargs: Any,
) -> torch.Tensor | GenerateDecoderOnlyOutput:
    """Speculative decoding as generate's decoding loop (the signature of ``GenerationMixin._sample``).

    Args:
        model: the target model (generate passes itself).
        input_ids: (B, S) int64 prompt, left-padded for B > 1.
        logits_processor, stopping_criteria, generation_config: as generate prepared them.
        speculative: the feature (dataclass, dict or shorthand) with a loaded draft model; a model patched with
            ``speculative=`` passes its own.
        **model_kwargs: generate's model inputs: ``past_key_values`` (the target's cache) and ``attention_mask``.
    Returns:
        (B, S + new) int64 sequences, or a ``GenerateDecoderOnlyOutput`` with ``sequences`` and
        ``past_key_values`` when ``return_dict_in_generate``.
    """
    feature = _feature(speculative)
    for flag in _UNSUPPORTED_OUTPUTS:
        if getattr(generation_config, flag, False):
            raise ValueError(f"speculative_generate: `{flag}` is not supported")
    if synced_gpus:
        raise ValueError("speculative_generate: `synced_gpus` is not supported")
    cache = model_kwargs.get("past_key_values")
    if cache is None:
        raise ValueError("speculative_generate: needs a cache (use_cache=True)")
    vocab = model.get_output_embeddings().weight.shape[0]
    draft = DraftModel(feature.draft, feature, vocab)
    mask = model_kwargs.get("attention_mask")
    pad = generation_config._pad_token_tensor
    finishes = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    do_sample = bool(generation_config.do_sample)
    active = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    target_logits = forward_unseen(model, cache, input_ids, mask, keep=1)
    cache.activate_past_recording()  # after the prefill, as generate does: only decode tokens are rolled back
    draft.prefill(input_ids, mask)
    no_draft = input_ids.new_zeros(input_ids.shape[0], 0), target_logits.new_zeros(*input_ids.shape[:1], 0, vocab)
    draft_tokens, draft_probs = no_draft
    while True:
        # 1. Verify: the target's processed distributions after each draft prefix (the last is the bonus one).
        scores = torch.stack(
            [
                logits_processor(torch.cat([input_ids, draft_tokens[:, :j]], dim=1), target_logits[:, j])
                for j in range(draft_tokens.shape[1] + 1)
            ],
            dim=1,
        )
        if do_sample:
            accepted, next_token = sample_accept(draft_tokens, draft_probs, torch.softmax(scores, dim=-1))
        else:
            accepted, next_token = greedy_accept(draft_tokens, scores)
        kept, new_tokens = common_acceptance(draft_tokens, accepted, next_token, active)
        # 2. Roll the target back to the accepted tokens (the last new token is not in its cache yet).
        cache.crop(kept - draft_tokens.shape[1])
        # 3. Append the new tokens one by one, as generate would, stopping rows that finish.
        for token in new_tokens.unbind(1):
            if finishes:
                token = torch.where(active, token, pad)
            input_ids = torch.cat([input_ids, token[:, None]], dim=1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            if streamer is not None:
                streamer.put(token.cpu())
            active &= ~stopping_criteria(input_ids, None)
            if not bool(active.any()):
                break
        if not bool(active.any()):
            break
        draft.rollback(input_ids.shape[1] - 1)
        # 4. Draft, without passing the maximum length (the last new token needs no draft).
        room = generation_config.max_length - input_ids.shape[1] - 1
        if room >= 1:
            draft_tokens, draft_probs = draft.propose(
                input_ids, mask, min(room, draft.max_tokens()), logits_processor, do_sample, active
            )
        else:
            draft_tokens, draft_probs = no_draft
        candidate = torch.cat([input_ids, draft_tokens], dim=1)
        candidate_mask = None if mask is None else torch.cat([mask, torch.ones_like(draft_tokens, dtype=mask.dtype)], 1)
        target_logits = forward_unseen(model, cache, candidate, candidate_mask, keep=draft_tokens.shape[1] + 1)
    if streamer is not None:
        streamer.end()
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=input_ids, past_key_values=cache)
    return input_ids
