"""Eviction policies: how a cache layer scores its stored tokens and which ones it keeps.

One policy object per full-attention layer (PyramidKV gives layers different budgets). A policy
never touches the cache's tensors: ``observe`` updates the per-slot scores the layer owns, and
``select`` names the slots to keep; the layer moves the data (``hf_longctx.cache.layers``).

Shapes: B batch, H / H_kv query / key-value heads, S stored slots, D head size. Scores are float32
(B, H_kv, S) and follow their slots through eviction, beam reordering and batch selection.
Selection is per key/value head (heads keep different tokens), except for TOVA and KVCrush, which
choose one set of tokens for all heads as their papers do. Every policy keeps, in each row, the first
``sink_tokens`` and the last ``recent`` real tokens, and keeps a padding slot only when the row has
fewer real tokens than the budget.
"""

from __future__ import annotations

import math

import torch

from ..config import KVEviction
from .scores import attention_mass, pool_along_keys


def real_token_ranks(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S) index of each slot among its row's real tokens, and (B, 1) real tokens per row."""
    counts = valid.long()
    return counts.cumsum(-1) - 1, counts.sum(-1, keepdim=True)


class EvictionPolicy:
    """Base policy: keep the most recent tokens (StreamingLLM). Subclasses add attention scores.

    Args:
        feature: the KVEviction parameters.
        budget_scale: this layer's budget relative to ``feature``'s (PyramidKV); 1.0 otherwise.
    """

    #: whether ``observe`` needs the queries (False: the layer still needs the padding mask).
    uses_attention = False

    def __init__(self, feature: KVEviction, budget_scale: float = 1.0):
        self.feature = feature
        self.budget_scale = budget_scale

    def budget(self, prompt_length: int) -> int | None:
        """Tokens to keep after an eviction, or None for no token eviction.

        Args:
            prompt_length: tokens seen by the end of the latest prefill (for ``ratio``).
        """
        feature = self.feature
        if feature.budget is not None:
            tokens = feature.budget
        elif feature.ratio is not None:
            tokens = math.ceil(feature.ratio * prompt_length)
        else:
            return None
        return max(feature.protected_tokens, round(tokens * self.budget_scale))

    def observe(
        self,
        scores: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        valid: torch.Tensor,
        scale: float | None,
        softcap: float | None,
        decoding: bool = False,
    ) -> None:
        """Update ``scores`` (B, H_kv, S) in place from the attention of ``query`` (B, H, Sq, D), the
        latest Sq tokens, over the stored ``key`` (B, H_kv, S, D); ``valid`` (B, S) marks real tokens.

        ``decoding``: False when ``query`` is one forward of several tokens (a prefill, a chunk of one, a
        verification); True when it gathers the queries of consecutive one-token decoding steps, which the
        layer buffers and hands over together before it evicts (the keys only grew meanwhile, so each
        query's attention over the keys visible to it is what it was at its own step).
        """

    def priority(self, scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, H_kv, S) float: +inf for sinks and recent tokens, -inf for padding, else the score."""
        ranks, counts = real_token_ranks(valid)
        protected = valid & ((ranks < self.feature.sink_tokens) | (ranks >= counts - self.feature.kept_recent))
        ranked = self.token_scores(scores, ranks)
        ranked = ranked.masked_fill(~valid[:, None], float("-inf"))
        return ranked.masked_fill(protected[:, None], float("inf"))

    def token_scores(self, scores: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
        """The importance of each slot, (B, H_kv, S); the base policy prefers recent tokens."""
        return ranks[:, None].float().expand_as(scores)

    def select(self, scores: torch.Tensor, valid: torch.Tensor, target: int) -> torch.Tensor:
        """Slots to keep: (B, H_kv, target) int64 indices into S, in any order."""
        return self.priority(scores, valid).topk(target, dim=-1).indices

    def choose_channels(self, query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
        """At a prefill: the key channels to store from now on, (B, H_kv, D_kept) int64 ascending, or
        None to store them all (only ThinK prunes channels)."""
        return None


class SnapKV(EvictionPolicy):
    """SnapKV: at a forward of several tokens (a prefill or a chunk of one), the last ``window`` queries'
    attention, pooled along the keys, scores every token (replacing older scores); each decoding step adds
    its query's attention, not pooled (pooling a sum of steps at once would treat the keys stored after a
    step as its neighbours, so the scores would depend on when the steps are scored)."""

    uses_attention = True

    def observe(self, scores, query, key, valid, scale, softcap, decoding=False):
        # The observed queries are the latest ones: mass over the keys visible to them.
        if decoding:
            scores.add_(attention_mass(query, key, scale=scale, softcap=softcap, valid=valid))
            return
        mass = attention_mass(query[:, :, -self.feature.window :], key, scale=scale, softcap=softcap, valid=valid)
        scores.copy_(pool_along_keys(mass, self.feature.pooling, valid))

    def token_scores(self, scores, ranks):
        return scores


class H2O(EvictionPolicy):
    """Heavy-Hitter Oracle: attention accumulated over every query so far."""

    uses_attention = True

    def observe(self, scores, query, key, valid, scale, softcap, decoding=False):
        scores.add_(attention_mass(query, key, scale=scale, softcap=softcap, valid=valid))

    def token_scores(self, scores, ranks):
        return scores


class TOVA(EvictionPolicy):
    """Token Omission Via Attention: the latest query's attention, averaged over all heads."""

    uses_attention = True

    def observe(self, scores, query, key, valid, scale, softcap, decoding=False):
        mass = attention_mass(query[:, :, -1:], key, scale=scale, softcap=softcap, valid=valid)
        scores.copy_(mass.mean(dim=1, keepdim=True).expand_as(scores))

    def token_scores(self, scores, ranks):
        return scores


class _OnTopOfPolicy(EvictionPolicy):
    """A policy that builds on a ``base`` policy: the base sees the attention and keeps its scores."""

    def __init__(self, feature: KVEviction, base: EvictionPolicy):
        super().__init__(feature, base.budget_scale)
        self.base = base
        self.uses_attention = base.uses_attention

    def observe(self, scores, query, key, valid, scale, softcap, decoding=False):
        self.base.observe(scores, query, key, valid, scale, softcap, decoding)


class KVCrush(_OnTopOfPolicy):
    """KVCrush on top of a ``base`` policy.

    The base policy's priorities (averaged over heads) fill the budget except ``representatives`` of
    its selectable part (beyond sinks and recent tokens). Each other real token gets a binary
    signature, one bit per key/value head: whether its score in that head is above the head's mean.
    Those tokens are ordered by the Hamming distance of their signature to the all-ones one (then by
    position) and cut into ``representatives`` equal buckets; the first token of each bucket is kept,
    so the kept tokens also cover the attention patterns the base policy would drop entirely.
    """

    def select(self, scores, valid, target):
        kv_heads, slots = scores.shape[1], scores.shape[2]
        shared = self.base.priority(scores, valid).mean(dim=1)  # (B, S); +-inf stay +-inf
        representatives = int(self.feature.representatives * (target - self.feature.protected_tokens))
        chosen = torch.zeros_like(valid)
        chosen.scatter_(1, shared.topk(target - representatives, dim=-1).indices, True)
        if representatives > 0:
            candidates = valid & ~chosen
            real = valid[:, None].float()
            head_mean = (scores * real).sum(-1, keepdim=True) / real.sum(-1, keepdim=True).clamp_min(1)
            distance = (scores <= head_mean).sum(dim=1)  # (B, S) heads whose bit is 0
            position = torch.arange(slots, device=scores.device)
            order_key = torch.where(candidates, distance * slots + position, (kv_heads + 1) * slots)
            ordered = order_key.argsort(dim=-1)
            count = candidates.sum(-1, keepdim=True)  # (B, 1)
            picks = torch.arange(representatives, device=scores.device)[None] * count // representatives
            picked = ordered.gather(1, picks.clamp(max=slots - 1))
            chosen = chosen | torch.zeros_like(chosen).scatter(1, picked, candidates.gather(1, picked))
        final = torch.where(chosen, torch.full_like(shared, float("inf")), shared)
        return final.topk(target, dim=-1).indices[:, None].expand(-1, kv_heads, -1)


class ThinK(_OnTopOfPolicy):
    """ThinK: the ``base`` policy's tokens, and fewer key channels.

    At the first prefill each key/value head keeps the ``channels`` fraction of its key channels with
    the largest ``|Q[:, c]| * |K[:, c]|``: the norm of channel c over the observation window's queries
    (the head's query group) times its norm over the stored real keys. Queries keep every channel;
    the pruned ones contribute nothing to q.k.
    """

    def select(self, scores, valid, target):
        return self.base.select(scores, valid, target)

    def choose_channels(self, query, key, valid):
        batch, heads, q_len, head_dim = query.shape
        kv_heads, stored = key.shape[1], key.shape[2]
        observed = min(self.feature.window, q_len)
        real_queries = valid[:, stored - observed :].float()  # (B, w): queries at padding count for nothing
        window = query[:, :, -observed:].float() * real_queries[:, None, :, None]
        query_norm = window.reshape(batch, kv_heads, -1, head_dim).norm(dim=2)  # (B, H_kv, D)
        key_norm = (key.float() * valid[:, None, :, None].float()).norm(dim=2)  # (B, H_kv, D)
        kept = max(1, round(self.feature.channels * head_dim))
        return (query_norm * key_norm).topk(kept, dim=-1).indices.sort(dim=-1).values


_BASE_POLICIES = {"streaming": EvictionPolicy, "snapkv": SnapKV, "h2o": H2O, "tova": TOVA}


def pyramid_scales(layers: int) -> list[float]:
    """PyramidKV budget multipliers, linear from 1.5 (first layer) to 0.5 (last); mean 1."""
    if layers == 1:
        return [1.0]
    return [1.5 - index / (layers - 1) for index in range(layers)]


def make_policies(feature: KVEviction, full_layers: int) -> list[EvictionPolicy]:
    """One policy per full-attention layer, in layer order."""
    policy = feature.policy
    if policy == "pyramidkv":
        return [SnapKV(feature, scale) for scale in pyramid_scales(full_layers)]
    if policy == "kvcrush":
        return [KVCrush(feature, _BASE_POLICIES[feature.base](feature)) for _ in range(full_layers)]
    if policy == "think":
        return [ThinK(feature, _BASE_POLICIES[feature.base](feature)) for _ in range(full_layers)]
    return [_BASE_POLICIES[policy](feature) for _ in range(full_layers)]
