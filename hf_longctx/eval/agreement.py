"""Draft/target top-1 next-token agreement on held-out text.

For speculative decoding, the fraction of positions where a draft model's most likely next token equals
the target's bounds the acceptance rate of greedy drafting. Both models read the same held-out windows
(``heldout_windows``) in one forward pass each; agreement is averaged over every predicted position.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import report
from .corpus import Document
from .perplexity import (
    DEFAULT_MAX_TOKENS,
    LOGITS_CHUNK,
    check_lengths,
    heldout_windows,
    logits_from_hidden,
    model_name,
    resolve_tokenizer,
    training_length,
)


@dataclass
class AgreementResult:
    """Top-1 agreement (fraction of positions, 0..1) of ``model_name`` (the draft) with ``target_name``."""

    model_name: str
    target_name: str
    lengths: list[int]
    agreement: list[float]
    num_samples: int
    training_length: int | None
    dataset: str
    command: str | None = None
    metadata: dict = field(default_factory=dict)

    task: ClassVar[str] = "agreement"

    def to_dict(self) -> dict:
        return {"task": self.task, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> AgreementResult:
        if data.get("task") != cls.task:
            raise ValueError(f"data: expected task {cls.task!r}, got {data.get('task')!r}")
        return cls(**{key: value for key, value in data.items() if key != "task"})

    def to_markdown(self) -> str:
        rows = [
            [length, report.length_multiple(length, self.training_length), f"{value:.4f}"]
            for length, value in zip(self.lengths, self.agreement)
        ]
        return report.markdown_table(
            ["length (tokens)", "x training length", f"top-1 agreement with {self.target_name}"], rows
        )

    def plot(self, path: str | Path) -> Path:
        return report.line_plot(
            path,
            self.lengths,
            {"top-1 agreement": self.agreement},
            xlabel="context length (tokens)",
            ylabel="fraction of positions",
            title=f"Draft/target agreement: {self.model_name} vs {self.target_name}",
            marker_x=self.training_length,
        )


@torch.no_grad()
def top1_tokens(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Most likely next token at every position of ``input_ids`` (B, L): LongTensor (B, L)."""
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
    return torch.cat(
        [
            logits_from_hidden(model, hidden[:, start : start + LOGITS_CHUNK]).argmax(dim=-1)
            for start in range(0, hidden.shape[1], LOGITS_CHUNK)
        ],
        dim=1,
    )


def draft_agreement(
    draft: PreTrainedModel,
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    lengths: Sequence[int],
    documents: Iterable[Document] | None = None,
    num_samples: int = 8,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    show_progress: bool = True,
) -> AgreementResult:
    """Fraction of positions where ``draft`` and ``target`` predict the same next token, per window length.

    The models must share a vocabulary; ``tokenizer`` defaults to the draft's own.
    """
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(
            f"target: vocabulary size {target.config.vocab_size} differs from the draft's {draft.config.vocab_size}"
        )
    tokenizer = resolve_tokenizer(draft, tokenizer)
    lengths = check_lengths(target, lengths, max_tokens=max_tokens)
    if num_samples < 1:
        raise ValueError(f"num_samples: must be a positive integer, got {num_samples}")
    dataset, windows = heldout_windows(tokenizer, lengths, num_samples, documents, target.device)
    agreement = []
    with tqdm(total=len(lengths) * num_samples, desc="agreement", unit="window", disable=not show_progress) as bar:
        for length in lengths:
            same = total = 0
            for window in windows[length].split(1):
                equal = top1_tokens(draft, window.to(draft.device)).to(target.device) == top1_tokens(target, window)
                same += int(equal.sum())
                total += equal.numel()
                bar.update(1)
            agreement.append(same / total)
    return AgreementResult(
        model_name=model_name(draft),
        target_name=model_name(target),
        lengths=lengths,
        agreement=agreement,
        num_samples=num_samples,
        training_length=training_length(draft),
        dataset=dataset,
    )
