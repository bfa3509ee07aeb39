"""Passkey retrieval and the needle-in-a-haystack grid: can the model find a key hidden at any depth?

Both run the same measurement on a (length x depth) grid: a prompt from ``passkey_text`` of about
``length`` tokens (the filler count is found by binary search) with the key line at ``depth`` (0 = start
of the filler, 1 = just before the question), then greedy generation of a few tokens. A sample is correct
when the generated text, stripped, starts with the key's digits. They differ in their defaults and their
plot: ``passkey_accuracy`` uses a few depths and several samples per cell and plots accuracy vs length
(one line per depth); ``needle_grid`` uses eleven depths and draws the grid as a heatmap.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import report
from .passkey import passkey_text, random_passkey
from .perplexity import DEFAULT_MAX_TOKENS, check_lengths, model_name, resolve_tokenizer, training_length

TASKS = ("passkey", "needle")
PASSKEY_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
NEEDLE_DEPTHS = tuple(i / 10 for i in range(11))
MAX_NEW_TOKENS = 8
SIZING_PASSKEY = 99_999
"""The key used to size prompts: as many digits as any ``random_passkey``."""


@dataclass
class RetrievalResult:
    """Retrieval accuracy on a (length x depth) grid.

    ``accuracy[i][j]`` is the fraction of ``num_samples`` prompts of about ``lengths[i]`` tokens with the key
    at ``depths[j]`` that were answered correctly; ``prompt_tokens[i][j]`` is their mean actual length.
    """

    task: str
    model_name: str
    lengths: list[int]
    depths: list[float]
    accuracy: list[list[float]]
    prompt_tokens: list[list[float]]
    num_samples: int
    training_length: int | None
    command: str | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task: must be one of {TASKS}, got {self.task!r}")

    def mean_accuracy(self) -> list[float]:
        """Accuracy at each length, averaged over depths."""
        return [sum(row) / len(row) for row in self.accuracy]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RetrievalResult:
        return cls(**data)

    def to_markdown(self) -> str:
        header = ["length (tokens)", "x training length", *(f"depth {d:g}" for d in self.depths), "mean"]
        rows = [
            [length, report.length_multiple(length, self.training_length), *(f"{a:.2f}" for a in row), f"{mean:.2f}"]
            for length, row, mean in zip(self.lengths, self.accuracy, self.mean_accuracy())
        ]
        return report.markdown_table(header, rows)

    def plot(self, path: str | Path) -> Path:
        """Passkey: accuracy vs length, one line per depth plus the mean. Needle: heatmap, depth x length."""
        title = f"{'Passkey retrieval' if self.task == 'passkey' else 'Needle in a haystack'}: {self.model_name}"
        if self.task == "needle":
            return report.heatmap(
                path,
                [list(column) for column in zip(*self.accuracy)],
                row_labels=[f"{d:g}" for d in self.depths],
                col_labels=[str(length) for length in self.lengths],
                xlabel="context length (tokens)",
                ylabel="depth (0 = start)",
                title=title,
            )
        series = {f"depth {d:g}": list(column) for d, column in zip(self.depths, zip(*self.accuracy))}
        series["mean"] = self.mean_accuracy()
        return report.line_plot(
            path,
            self.lengths,
            series,
            xlabel="context length (tokens)",
            ylabel="accuracy",
            title=title,
            marker_x=self.training_length,
            ylim=(-0.05, 1.05),
        )


def check_depths(depths: Sequence[float]) -> list[float]:
    """Validate ``depths``: a non-empty sequence of numbers in [0, 1]; ValueError naming the parameter."""
    if not depths:
        raise ValueError("depths: give at least one depth in [0, 1]")
    for depth in depths:
        if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
            raise ValueError(f"depths: each depth must be a number in [0, 1] (0 = start, 1 = end), got {depth!r}")
    return [float(depth) for depth in depths]


def passkey_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    lengths: Sequence[int],
    depths: Sequence[float] = PASSKEY_DEPTHS,
    num_samples: int = 5,
    seed: int = 0,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    show_progress: bool = True,
) -> RetrievalResult:
    """Passkey accuracy vs length (tokens) and depth; ``num_samples`` random keys per cell, from ``seed``."""
    return _retrieval("passkey", model, tokenizer, lengths, depths, num_samples, seed, max_tokens, show_progress)


def needle_grid(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    lengths: Sequence[int],
    depths: Sequence[float] = NEEDLE_DEPTHS,
    num_samples: int = 1,
    seed: int = 0,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    show_progress: bool = True,
) -> RetrievalResult:
    """The needle-in-a-haystack grid (length in tokens x depth), plotted as a heatmap."""
    return _retrieval("needle", model, tokenizer, lengths, depths, num_samples, seed, max_tokens, show_progress)


def _retrieval(
    task: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    lengths: Sequence[int],
    depths: Sequence[float],
    num_samples: int,
    seed: int,
    max_tokens: int,
    show_progress: bool,
) -> RetrievalResult:
    tokenizer = resolve_tokenizer(model, tokenizer)
    lengths = check_lengths(model, lengths, max_tokens=max_tokens)
    depths = check_depths(depths)
    if num_samples < 1:
        raise ValueError(f"num_samples: must be a positive integer, got {num_samples}")
    rng = random.Random(seed)
    accuracy, prompt_tokens = [], []
    total = len(lengths) * len(depths) * num_samples
    with tqdm(total=total, desc=task, unit="prompt", disable=not show_progress) as bar:
        for length in lengths:
            accuracy.append([])
            prompt_tokens.append([])
            for depth in depths:
                num_filler = _num_filler(tokenizer, length, depth)
                correct = tokens = 0
                for _ in range(num_samples):
                    prompt, answer = passkey_text(num_filler, depth, random_passkey(rng))
                    input_ids = tokenizer(prompt, return_tensors="pt", verbose=False)["input_ids"].to(model.device)
                    correct += _generate(model, tokenizer, input_ids).strip().startswith(answer.strip())
                    tokens += input_ids.shape[1]
                    bar.update()
                accuracy[-1].append(correct / num_samples)
                prompt_tokens[-1].append(tokens / num_samples)
    return RetrievalResult(
        task=task,
        model_name=model_name(model),
        lengths=lengths,
        depths=depths,
        accuracy=accuracy,
        prompt_tokens=prompt_tokens,
        num_samples=num_samples,
        training_length=training_length(model),
    )


def _prompt_tokens(tokenizer: PreTrainedTokenizerBase, num_filler: int, depth: float) -> int:
    prompt, _ = passkey_text(num_filler, depth, SIZING_PASSKEY)
    return len(tokenizer(prompt, verbose=False)["input_ids"])


def _num_filler(tokenizer: PreTrainedTokenizerBase, length: int, depth: float) -> int:
    """The largest filler count whose prompt fits in ``length`` tokens (binary search over ``num_filler``)."""
    shortest = _prompt_tokens(tokenizer, 0, depth)
    if shortest > length:
        raise ValueError(
            f"lengths: {length} tokens is shorter than a passkey prompt without filler ({shortest} tokens)"
        )
    low, high = 0, 1
    while _prompt_tokens(tokenizer, high, depth) <= length:
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        if _prompt_tokens(tokenizer, middle, depth) <= length:
            low = middle
        else:
            high = middle
    return low


@torch.no_grad()
def _generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, input_ids: torch.Tensor) -> str:
    """Greedy continuation of ``input_ids`` (1, S): MAX_NEW_TOKENS tokens, decoded without special tokens."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        pad_token_id=pad,
    )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
