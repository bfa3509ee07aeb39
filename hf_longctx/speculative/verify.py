"""Verification rules of speculative decoding, as pure functions over tensors.

Shapes: B batch rows, G draft tokens of the round, V vocabulary. ``target`` scores/probabilities have G + 1
positions: position j is the target's next-token distribution after the j first draft tokens (the last one is
the bonus position, after all G). Every rule returns ``(accepted, next_token)``: (B,) int64 draft tokens
accepted per row, and (B,) int64 the token that follows them (the target's correction, or the bonus token
when all G were accepted).
"""

from __future__ import annotations

import torch


def greedy_accept(draft_tokens: torch.Tensor, target_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification: the longest prefix of the draft equal to the target's argmax tokens.

    Args:
        draft_tokens: (B, G) int64 drafted tokens.
        target_scores: (B, G + 1, V) the target's processed scores (logits after the logits processors).
    """
    target_tokens = target_scores.argmax(-1)  # (B, G + 1)
    matches = (draft_tokens == target_tokens[:, :-1]).long()
    accepted = matches.cumprod(-1).sum(-1)
    return accepted, target_tokens.gather(1, accepted[:, None])[:, 0]


def sample_accept(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling: accept draft token j with probability min(1, p_j(x_j) / q_j(x_j)); at the first
    rejection draw from norm(max(p_j - q_j, 0)); after G acceptances draw the bonus token from p_G.

    The tokens so produced have the target's distribution p whatever the draft's q is, provided q is the
    distribution each draft token was actually sampled from.

    Args:
        draft_tokens: (B, G) int64 drafted tokens.
        draft_probs: (B, G, V) float q: the distributions the draft tokens were sampled from.
        target_probs: (B, G + 1, V) float p: the target's distributions after its logits processors.
        generator: random source for the acceptance tests and the draws (None: torch's global one).
    """
    batch, drafted = draft_tokens.shape
    p = target_probs[:, :drafted].gather(-1, draft_tokens[..., None])[..., 0]
    q = draft_probs.gather(-1, draft_tokens[..., None])[..., 0]
    uniform = torch.rand(batch, drafted, generator=generator, device=draft_tokens.device)
    accepted = (uniform * q <= p).long().cumprod(-1).sum(-1)  # u <= p / q, without dividing by q = 0
    rows = torch.arange(batch, device=draft_tokens.device)
    p_next = target_probs[rows, accepted]  # p at the first rejected position, or the bonus p_G
    padded_q = torch.cat([draft_probs, draft_probs.new_zeros(batch, 1, draft_probs.shape[-1])], dim=1)
    residual = torch.where((accepted < drafted)[:, None], (p_next - padded_q[rows, accepted]).clamp(min=0), p_next)
    # p == q exactly leaves no mass after a rejection (which then has probability 0): fall back to p.
    residual = torch.where(residual.sum(-1, keepdim=True) <= 0, p_next, residual)
    return accepted, sample_from(residual, generator)


def sample_from(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) int64 one token per row drawn with probability proportional to ``weights`` ((B, V) >= 0, not
    necessarily normalised), by the exponential race argmax(w / E), E ~ Exp(1): no host sync (a CUDA graph can
    capture it), unlike ``torch.multinomial``'s checks."""
    race = torch.empty_like(weights, dtype=torch.float32).exponential_(generator=generator)
    return (weights.float() / race).argmax(-1)


def common_acceptance(
    draft_tokens: torch.Tensor, accepted: torch.Tensor, next_token: torch.Tensor, active: torch.Tensor
) -> tuple[int, torch.Tensor]:
    """One accepted length for the whole batch: the minimum over the active rows.

    Rows that accepted more keep their draft token at that position (it passed verification), so every row
    emits tokens of its own verified output, cut at a length that does not depend on its own tokens:
    greedy output stays identical and sampling keeps the target's distribution.

    Args:
        draft_tokens: (B, G) int64; accepted, next_token: (B,) int64 from a verification rule.
        active: (B,) bool rows still generating (finished rows do not hold the others back).
    Returns:
        (n, tokens): n draft tokens kept for every row, and (B, n + 1) int64 tokens to append.
    """
    drafted = draft_tokens.shape[1]
    n = int(torch.where(active, accepted, drafted).min())  # drafted when no row is active
    last = next_token if n == drafted else torch.where(accepted > n, draft_tokens[:, min(n, drafted - 1)], next_token)
    return n, torch.cat([draft_tokens[:, :n], last[:, None]], dim=1)
