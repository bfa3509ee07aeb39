"""E2-LLM augmentation: per training sample, a random RoPE scale and a random position offset.

E2-LLM trains once on short sequences while showing the model the position densities and distances a
long context will bring: each sample gets a scale ``g`` (positions divided by ``g``, as position
interpolation does at inference) and an offset ``t``. RoPE only sees position differences and position ids
rotate queries and keys alike, so a shift of a whole sample changes nothing; the offset is applied as a skip
of ``t`` positions at a random point of the sample, so distances across it grow by ``t``:

    position_ids'[b, i] = (position_ids[b, i] + t_b * [position_ids[b, i] >= c_b]) / g_b

with g_b drawn from ``scales``, t_b uniform in [0, max_position - S] and c_b uniform in [1, S - 1].

For the training issue: apply it to each batch before the forward pass (a collator or a
``Trainer.compute_loss`` override), and give the batch an explicit 2D ``attention_mask``: the float, not
unit-step position ids must not be read as packed sequences. At inference, use linear scaling
(``rope="linear:G"``) with G the extension wanted, within ``max(scales)``. Attention functions that infer
packing from position ids (flash_attention_2, ``longctx_sink`` and ``longctx_rope_remap`` without a padding
mask) are not meant to train with it; sdpa and eager are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class E2LLMAugmentation:
    """Random scale and position offset per sample (E2-LLM), applied to position ids.

    Attributes:
        max_position: the largest position (tokens, before scaling) an offset may reach: the target length.
        scales: the scale factors g to draw from (uniformly); each >= 1.
    """

    max_position: int
    scales: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)

    def __post_init__(self) -> None:
        if isinstance(self.max_position, bool) or not isinstance(self.max_position, int) or self.max_position < 2:
            raise ValueError(f"E2LLMAugmentation: `max_position` must be an integer >= 2, got {self.max_position!r}")
        if not self.scales or any(isinstance(g, bool) or not isinstance(g, (int, float)) or g < 1 for g in self.scales):
            raise ValueError(
                f"E2LLMAugmentation: `scales` must be a non-empty list of numbers >= 1, got {self.scales!r}"
            )
        object.__setattr__(self, "scales", tuple(float(g) for g in self.scales))

    def __call__(self, position_ids: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augmented position ids.

        Args:
            position_ids: (B, S) integer positions (``arange(S)`` per row, or restarting for packed rows).
            generator: a CPU ``torch.Generator`` for reproducible draws.
        Returns:
            (B, S) float32 on ``position_ids.device``.
        """
        batch, length = position_ids.shape
        if length > self.max_position:
            raise ValueError(
                f"E2LLMAugmentation: sequences of {length} tokens exceed `max_position` ({self.max_position})"
            )
        choice = torch.randint(len(self.scales), (batch,), generator=generator)
        scale = torch.tensor(self.scales)[choice]
        offset = torch.randint(self.max_position - length + 1, (batch,), generator=generator)
        cut = torch.randint(1, max(length, 2), (batch,), generator=generator)
        device = position_ids.device
        positions = position_ids.float()
        skip = (position_ids >= cut.to(device)[:, None]).float() * offset.to(device)[:, None]
        return (positions + skip) / scale.to(device)[:, None]
