"""``speculative_generate``: the decoding loop that ``model.generate`` runs as its ``custom_generate`` callable.

    out = model.generate(ids, custom_generate=lc.speculative_generate, speculative=lc.Speculative(draft=draft))
    lc.patch(model, speculative=lc.Speculative(draft=draft)); out = model.generate(ids)   # the same

Generate prepares the cache, logits processors and stopping criteria, then calls this loop. Each round the
drafter (a draft model, or the target over a view of its own cache: ``drafter``) proposes G tokens, the target
scores G + 1 positions in one forward over its cache, a verification rule (``verify``) accepts a prefix per
row, and the caches roll back by cropping (a pointer move in a ``LongCtxCache``).

Batch > 1: each row advances by its own accepted count (``sequences``: rows that accepted fewer drafts
leave holes, masked like padding; nothing is re-padded; on CUDA the attention kernel's decode path reads
them). Caches with sliding-window or other non-full layers (whose windows count slots), and CUDA models whose
verification has more query rows than that path takes (``sink_window.takes_holes``), keep one accepted length
per round instead, the minimum over the active rows (``verify.common_acceptance``). Both are exact: greedy
output equals plain generate row by row, and sampling keeps the target's distribution.

Rounds without drafts (the last token, and an adaptive call's plain steps) are plain decoding steps: through
the drafter's graph-captured step where it has one (``SelfDraft`` with ``cuda_graphs``).

Self-speculation with ``cuda_graphs`` runs whole rounds on the device instead (``rounds.StaticRounds``, one CUDA
graph per draft length) wherever the call allows it (``rounds.unsupported_reason``); otherwise the rounds above run,
and a warning says why.
"""

from __future__ import annotations

import contextlib
import time
import types
from collections.abc import Iterator
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.generation import GenerateDecoderOnlyOutput, LogitsProcessorList, StoppingCriteriaList
from transformers.utils import logging

from ..attention.kv import KV_ATTENTION_NAME
from ..cache import LongCtxCache, LongCtxLayer
from ..config import SinkAttention, Speculative, parse_feature
from . import rounds
from .drafter import Drafter, DraftModel, SelfDraft, draft_view
from .forward import forward_unseen
from .gain import DraftLength, SpeculationGain
from .sequences import Sequences, stop_rule
from .verify import common_acceptance, greedy_accept, sample_accept

logger = logging.get_logger(__name__)

_UNSUPPORTED_OUTPUTS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")


def _feature(speculative: Any) -> Speculative:
    """The Speculative feature of this call, with a loaded draft model."""
    feature = parse_feature("speculative", speculative)
    if feature is None:
        raise ValueError(
            "speculative_generate: no `speculative` feature: pass speculative=lc.Speculative(draft=...) to generate "
            "or patch the model with lc.patch(model, speculative=...)"
        )
    if feature.draft != "self" and not isinstance(feature.draft, PreTrainedModel):
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
        speculative: the feature (dataclass, dict or shorthand) with a loaded draft model or ``draft="self"``;
            a model patched with ``speculative=`` passes its own.
        **model_kwargs: generate's model inputs: ``past_key_values`` (the target's cache) and ``attention_mask``.
    Returns:
        (B, S + new) int64 sequences (rows that finished early padded), or a ``GenerateDecoderOnlyOutput`` with
        ``sequences`` and ``past_key_values`` when ``return_dict_in_generate``.
    Raises:
        ValueError: unsupported generate options, no cache, a draft of another vocabulary, or self-speculation
            on a model whose attention cannot apply the draft view.
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
    if feature.draft != "self":
        sequences = _decode(model, cache, DraftModel(feature.draft, feature, vocab), feature, input_ids,
                            model_kwargs.get("attention_mask"), logits_processor, stopping_criteria,
                            generation_config, streamer)
    else:
        cache = _own_cache(model, cache, generation_config, feature.cuda_graphs)
        mask = model_kwargs.get("attention_mask")
        view = draft_view(feature, cache)  # its errors first
        with _kv_attention(model):
            drafts = rounds.most_drafts(model, feature)
            reason = rounds.unsupported_reason(model, cache, _full_attention(model, cache), drafts, logits_processor,
                                               stopping_criteria, streamer) if feature.cuda_graphs else None
            if reason is not None:
                logger.warning_once(f"Speculative(cuda_graphs=True): {reason}; the rounds run eagerly, with "
                                    "graph-replayed draft steps")
            if feature.cuda_graphs and reason is None:
                sequences = _decode_static(model, cache, view, feature, drafts, input_ids, mask, logits_processor,
                                           stopping_criteria, generation_config)
            else:
                sequences = _decode(model, cache, SelfDraft(model, cache, feature), feature, input_ids, mask,
                                    logits_processor, stopping_criteria, generation_config, streamer)
    if streamer is not None:
        streamer.end()
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=sequences, past_key_values=cache)
    return sequences


def _own_cache(model: PreTrainedModel, cache: Cache, generation_config: GenerationConfig,
               cuda_graphs: bool) -> LongCtxCache:
    """Self-speculation's cache: the ``LongCtxCache`` passed in, or one replacing generate's empty default
    (with ``cuda_graphs``, one whose every layer is a ``LongCtxLayer``)."""
    if isinstance(cache, LongCtxCache):
        return cache
    if cache.get_seq_length() != 0:
        raise ValueError(
            f"Speculative: draft='self' drafts through a view of a LongCtxCache; got a filled {type(cache).__name__}: "
            "pass past_key_values=lc.LongCtxCache(model) or none"
        )
    return LongCtxCache(model, reserve=generation_config.max_length, cuda_graphs=cuda_graphs)


@contextlib.contextmanager
def _kv_attention(model: PreTrainedModel) -> Iterator[None]:
    """Run the model with ``longctx_kv`` (the attention function that applies the draft view) for the call."""
    previous = model.config.get_text_config(decoder=True)._attn_implementation
    if previous == KV_ATTENTION_NAME:
        yield
        return
    if previous.startswith("longctx_") and previous != "longctx_sink":
        raise ValueError(
            f"Speculative: draft='self' needs the {KV_ATTENTION_NAME!r} attention (it applies the draft view); the "
            f"model runs {previous!r}, which it cannot replace"
        )
    model.set_attn_implementation(KV_ATTENTION_NAME)  # it applies a patched sink feature too (attention.kv)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _full_attention(model: PreTrainedModel, cache: Cache) -> bool:
    """Whether every layer is full attention (windows count slots; a ``LongCtxCache(cuda_graphs=True)`` holds
    sliding-window layers in ``LongCtxLayer``s too), so that rows may advance by their own counts."""
    stock = DynamicCache(config=model.config.get_text_config(decoder=True)).layers
    return all(type(layer) is DynamicLayer for layer in stock) and all(
        isinstance(layer, LongCtxLayer) or type(layer) is DynamicLayer for layer in cache.layers)


def _per_row(model: PreTrainedModel, cache: Cache, verify_rows: int) -> bool:
    """Whether rows may advance by their own counts: every layer is full attention, and the attention kernel's
    decode path takes the verification's ``verify_rows`` queries with holes in the mask."""
    return rounds.kernel_takes(model, verify_rows) and _full_attention(model, cache)


def _decode_static(
    model: PreTrainedModel,
    cache: LongCtxCache,
    view: SinkAttention,
    feature: Speculative,
    longest: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
) -> torch.Tensor:
    """Self-speculation in graph-captured rounds (``rounds.StaticRounds``) through the draft ``view``; a fixed draft
    length, or with ``"adaptive"`` the length ``gain.DraftLength`` picks each round. Returns the (B, S + new)
    sequences."""
    room, eos = stop_rule(stopping_criteria, input_ids.shape[1])
    pad = generation_config._pad_token_tensor
    state = rounds.StaticRounds(model, cache, view, logits_processor,
                                bool(generation_config.do_sample), input_ids, attention_mask, room, eos,
                                None if pad is None else int(pad), longest)
    adaptive = DraftLength(longest) if feature.num_draft_tokens == "adaptive" else None
    logits = forward_unseen(model, cache, input_ids, attention_mask, keep=1)[:, 0]
    try:
        going_on = state.start(logits, reserve=2 * room + 2 * (longest + 2))
        clock = time.perf_counter()
        while going_on:
            drafts = adaptive.next() if adaptive is not None else longest
            status = state.run(drafts)
            if adaptive is not None:  # a round's time: from the previous round's host read to its own
                now = time.perf_counter()
                adaptive.record(drafts, now - clock, status.rows, status.reached, status.steady)
                clock = now
            going_on = status.active
    finally:
        state.stop()
    return state.output()


def _decode(
    model: PreTrainedModel,
    cache: Cache,
    drafter: Drafter,
    feature: Speculative,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    streamer: Any,
) -> torch.Tensor:
    """The rounds: verify, accept per row, roll back, draft. Returns the (B, S + new) sequences."""
    sequences = Sequences(input_ids, attention_mask)
    per_row, do_sample = _per_row(model, cache, drafter.max_tokens() + 1), bool(generation_config.do_sample)
    gain = SpeculationGain() if feature.num_draft_tokens == "adaptive" else None
    active = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    logits = forward_unseen(model, cache, sequences.slots, sequences.mask, keep=1)
    cache.activate_past_recording()  # after the prefill, as generate does: only decode tokens are rolled back
    drafter.prefill(sequences)
    try:
        drafts = input_ids.new_zeros(input_ids.shape[0], 0)
        draft_probs = logits.new_zeros(logits.shape[0], 0, logits.shape[-1])
        no_drafts = drafts, draft_probs
        clock = time.perf_counter()
        while True:
            # 1. Verify: the target's processed scores after each draft prefix (the last is the bonus position).
            drafted = drafts.shape[1]
            scores = torch.stack(
                [sequences.process(logits_processor, logits[:, j], drafts[:, :j]) for j in range(drafted + 1)], dim=1
            )
            if do_sample:
                accepted, next_token = sample_accept(drafts, draft_probs, torch.softmax(scores, dim=-1))
            else:
                accepted, next_token = greedy_accept(drafts, scores)
            # 2. The round's columns: per row, its accepted drafts (holes after them up to the longest) + its token.
            if per_row:
                kept = int(torch.where(active, accepted, 0).max())  # (boolean indexing would sync once more)
                holes = (torch.arange(kept, device=accepted.device) >= accepted[:, None]) & active[:, None]
                columns = torch.cat([drafts[:, :kept], next_token[:, None]], dim=1)
            else:
                kept, columns = common_acceptance(drafts, accepted, next_token, active)
                holes = torch.zeros_like(drafts[:, :kept], dtype=torch.bool)
            # 3. Roll the target back to them (the round's last token is not in its cache yet).
            start = sequences.length
            if isinstance(cache, LongCtxCache):
                cache.mark_holes(holes, start)
            cache.crop(kept - drafted)
            rows, before = active.clone(), sequences.counts.clone()
            sequences.append(columns, torch.cat([holes, holes.new_zeros(holes.shape[0], 1)], dim=1), active,
                             stopping_criteria, streamer)
            # one host read: whether a row goes on, the most tokens an active row may still emit, and the tokens
            # the round's rows emitted (for the adaptive rule's timing)
            remaining = torch.where(active, generation_config.max_length - sequences.prompt - sequences.counts, -1)
            emitted = torch.where(rows, sequences.counts - before, 0).sum()
            going_on, most_left, emitted, n_rows = torch.stack(
                [active.any().long(), remaining.max(), emitted, rows.sum()]).tolist()
            if not going_on:
                break
            if gain is not None:
                now = time.perf_counter()
                gain.record("speculative" if drafted else "plain", emitted / max(n_rows, 1), now - clock)
                clock = now
            # 4. Draft, without passing the maximum length (the last new token needs no draft).
            if isinstance(drafter, DraftModel):
                drafter.rollback(sequences.length - 1, holes, start)
            room = most_left - 1
            if room >= 1 and (gain is None or gain.mode == "speculative"):
                drafts, draft_probs = drafter.propose(
                    sequences, min(room, drafter.max_tokens()), logits_processor, do_sample, active
                )
                logits = forward_unseen(model, cache, *sequences.with_drafts(drafts), keep=drafts.shape[1] + 1)
            else:  # a plain step, through the drafter's graph-captured step where it has one
                drafts, draft_probs = no_drafts
                logits = drafter.plain_logits(model, cache, sequences)
    finally:
        drafter.close()
    return sequences.output(generation_config._pad_token_tensor)
