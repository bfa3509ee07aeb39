"""Perplexity vs context length on held-out long documents, one forward pass per window.

For every requested length L, ``num_samples`` contiguous windows of L tokens are cut from the held-out
documents (concatenated with EOS between documents), and the mean next-token NLL over the WHOLE window is
computed in one forward pass: no sliding, no striding, so the tokens near the end of a window are predicted
from up to L - 1 tokens of context. That is what tests a model's long context. The same text is used at
every length (window i at length L is a prefix of window i at the largest length), so the numbers are
comparable across lengths.

This module also holds the argument guards that every evaluation shares: the tokenizer lookup, the length
and memory checks, and the model's training length.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from . import report
from .corpus import Document, iter_documents

DEFAULT_MAX_TOKENS = 131072
"""Lengths above this many tokens are refused unless ``max_tokens=`` is raised explicitly."""

LOGITS_CHUNK = 4096
"""Positions whose logits are materialised at once: (batch, LOGITS_CHUNK, vocab) float32."""

CORPUS_DATASET = "hf-longctx held-out Python sources (validation split)"
"""What ``perplexity_vs_length`` reads when no documents are given: ``iter_documents("validation")``."""

MAX_CHARS_PER_TOKEN = 16
"""Upper bound on characters per token, used to tokenize only the part of a document that is needed."""


def model_name(model: PreTrainedModel) -> str:
    """The model's Hub id, or the folder name of a local checkpoint (never a path of this machine)."""
    name = model.name_or_path or model.config.model_type
    return Path(name).resolve().name if os.path.isdir(name) else name


def training_length(model: PreTrainedModel) -> int | None:
    """``max_position_embeddings`` of the (text) config: the context length the model was trained at."""
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


def resolve_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> PreTrainedTokenizerBase:
    """``tokenizer`` itself, else the tokenizer saved beside the model; ValueError when there is none."""
    if tokenizer is not None:
        return tokenizer
    source = model.name_or_path
    try:
        if not source:
            raise OSError("the model has no name_or_path")
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(
            f"tokenizer: no tokenizer found for model {source!r} ({str(error).splitlines()[0]}); "
            "pass tokenizer= explicitly (on the command line: --tokenizer PATH)"
        ) from error


def estimate_memory_bytes(model: PreTrainedModel, length: int, batch_size: int = 1) -> int:
    """Rough device memory, in bytes, to run ``batch_size`` sequences of ``length`` tokens through ``model``.

    Counts the KV cache of every layer (2 * layers * kv_heads * head_dim per token), the activations of one
    layer (residual, attention projections and the MLP: 4 * hidden + 2 * intermediate per token), both in
    the model's dtype, and one float32 chunk of logits. Weights are already resident and not counted.
    """
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    intermediate = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim + 4 * config.hidden_size + 2 * intermediate
    element = torch.finfo(model.dtype).bits // 8
    logits = min(length, LOGITS_CHUNK) * config.vocab_size * 4
    return batch_size * (length * per_token * element + logits)


def check_lengths(
    model: PreTrainedModel, lengths: Sequence[int], *, batch_size: int = 1, max_tokens: int = DEFAULT_MAX_TOKENS
) -> list[int]:
    """Validate ``lengths`` (tokens): positive integers, at most ``max_tokens``, and on CUDA within free memory.

    Returns them as a list of ints; raises ValueError naming the parameter otherwise.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: must be a positive integer, got {batch_size}")
    if not lengths:
        raise ValueError("lengths: give at least one length (tokens)")
    for length in lengths:
        if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
            raise ValueError(f"lengths: each length must be a positive integer number of tokens, got {length!r}")
        if length > max_tokens:
            raise ValueError(
                f"lengths: {length} tokens exceeds max_tokens={max_tokens}; pass a larger max_tokens= "
                "if the device has the memory for it"
            )
    if model.device.type == "cuda":
        longest = max(lengths)
        needed = estimate_memory_bytes(model, longest, batch_size)
        free, _ = torch.cuda.mem_get_info(model.device)
        if needed > free:
            raise ValueError(
                f"lengths: {longest} tokens x batch {batch_size} needs about {needed / 2**30:.1f} GiB "
                f"(KV cache + activations) but only {free / 2**30:.1f} GiB are free on {model.device}; "
                "use shorter lengths or a smaller batch_size"
            )
    return list(lengths)


@dataclass
class PerplexityResult:
    """Perplexity at each context length. Lengths in tokens, NLL in nats per token.

    ``dataset`` names the text: ``CORPUS_DATASET``, or ``"caller-supplied documents"``.
    """

    model_name: str
    lengths: list[int]
    nll: list[float]
    perplexity: list[float]
    num_samples: int
    training_length: int | None
    dataset: str
    command: str | None = None
    metadata: dict = field(default_factory=dict)

    task: ClassVar[str] = "ppl"

    def to_dict(self) -> dict:
        return {"task": self.task, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> PerplexityResult:
        if data.get("task") != cls.task:
            raise ValueError(f"data: expected task {cls.task!r}, got {data.get('task')!r}")
        return cls(**{key: value for key, value in data.items() if key != "task"})

    def to_markdown(self) -> str:
        rows = [
            [length, report.length_multiple(length, self.training_length), f"{nll:.4f}", f"{ppl:.3f}"]
            for length, nll, ppl in zip(self.lengths, self.nll, self.perplexity)
        ]
        return report.markdown_table(["length (tokens)", "x training length", "mean NLL (nats)", "perplexity"], rows)

    def plot(self, path: str | Path) -> Path:
        return report.line_plot(
            path,
            self.lengths,
            {"perplexity": self.perplexity},
            xlabel="context length (tokens)",
            ylabel="perplexity",
            title=f"Perplexity vs length: {self.model_name}",
            marker_x=self.training_length,
            logy=True,
        )


def perplexity_vs_length(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    lengths: Sequence[int],
    documents: Iterable[Document] | None = None,
    num_samples: int = 4,
    batch_size: int = 1,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    show_progress: bool = True,
) -> PerplexityResult:
    """Mean token NLL and perplexity of ``model`` over windows of each length in ``lengths`` (tokens).

    ``documents`` defaults to ``iter_documents(split="validation")``. Each window starts with BOS when the
    tokenizer has one; the NLL averages over the L - 1 predicted tokens of the window.
    """
    tokenizer = resolve_tokenizer(model, tokenizer)
    lengths = check_lengths(model, lengths, batch_size=batch_size, max_tokens=max_tokens)
    if num_samples < 1:
        raise ValueError(f"num_samples: must be a positive integer, got {num_samples}")
    if any(length < 2 for length in lengths):
        raise ValueError("lengths: perplexity needs windows of at least 2 tokens")
    dataset, windows = heldout_windows(tokenizer, lengths, num_samples, documents, model.device)

    nll = []
    with tqdm(total=len(lengths) * num_samples, desc="perplexity", unit="window", disable=not show_progress) as bar:
        for length in lengths:
            if not nll:
                _check_logits(model, windows[length][:1, :32])
            total = 0.0
            for batch in windows[length].split(batch_size):
                total += window_nll(model, batch).sum().item()
                bar.update(len(batch))
            nll.append(total / num_samples)
    return PerplexityResult(
        model_name=model_name(model),
        lengths=lengths,
        nll=nll,
        perplexity=[math.exp(value) for value in nll],
        num_samples=num_samples,
        training_length=training_length(model),
        dataset=dataset,
    )


def heldout_windows(
    tokenizer: PreTrainedTokenizerBase,
    lengths: Sequence[int],
    num_samples: int,
    documents: Iterable[Document] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[str, dict[int, torch.Tensor]]:
    """``num_samples`` token windows of each length, cut from held-out documents.

    ``documents`` defaults to ``iter_documents(split="validation")``. Window i of length L is the prefix of
    window i of the longest length, so results are comparable across lengths; each window starts with BOS
    when the tokenizer has one. Returns the dataset's name and {length: LongTensor (num_samples, length)}.
    """
    prefix = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    stride = max(lengths) - len(prefix)
    dataset = CORPUS_DATASET if documents is None else "caller-supplied documents"
    documents = iter_documents("validation") if documents is None else documents
    stream = _token_stream(tokenizer, documents, num_samples * stride)
    windows = {
        length: torch.tensor(
            [prefix + stream[i * stride : i * stride + length - len(prefix)] for i in range(num_samples)],
            device=device,
        )
        for length in lengths
    }
    return dataset, windows


def _token_stream(tokenizer: PreTrainedTokenizerBase, documents: Iterable[Document], num_tokens: int) -> list[int]:
    """The first ``num_tokens`` tokens of the documents joined with EOS; ValueError if they hold fewer."""
    tokens: list[int] = []
    for document in documents:
        text = document.text[: (num_tokens - len(tokens)) * MAX_CHARS_PER_TOKEN]
        tokens += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            tokens.append(tokenizer.eos_token_id)
        if len(tokens) >= num_tokens:
            return tokens[:num_tokens]
    raise ValueError(
        f"documents: they hold {len(tokens)} tokens but the longest length x num_samples needs {num_tokens}; "
        "pass more or longer documents, shorter lengths or fewer num_samples"
    )


def logits_from_hidden(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits (B, S, vocab) from final hidden states (B, S, hidden), with the model's logit softcap."""
    logits = model.get_output_embeddings()(hidden).float()
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


@torch.no_grad()
def window_nll(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL in nats of each window of ``input_ids`` (B, L): float32 tensor (B,).

    One forward pass of the decoder over the whole window; logits are computed LOGITS_CHUNK positions at a
    time so that memory stays O(L * hidden) rather than O(L * vocab).
    """
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
    targets = input_ids[:, 1:]
    total = torch.zeros(input_ids.shape[0], device=input_ids.device)
    for start in range(0, targets.shape[1], LOGITS_CHUNK):
        logits = logits_from_hidden(model, hidden[:, start : start + LOGITS_CHUNK])
        chunk = targets[:, start : start + LOGITS_CHUNK]
        total += F.cross_entropy(logits.transpose(1, 2), chunk, reduction="none").sum(dim=1)
    return total / targets.shape[1]


@torch.no_grad()
def _check_logits(model: PreTrainedModel, input_ids: torch.Tensor) -> None:
    """Refuse models whose logits are not ``lm_head(hidden)`` (+ softcap): chunked NLL would be wrong for them."""
    expected = model(input_ids=input_ids, use_cache=False).logits.float()
    actual = logits_from_hidden(model, model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state)
    if not torch.allclose(actual, expected, rtol=1e-3, atol=1e-3):
        raise NotImplementedError(
            f"model type {model.config.model_type!r}: its logits are not the output embeddings applied to the "
            "decoder's hidden states (plus final_logit_softcapping), so perplexity_vs_length cannot compute "
            "them in chunks"
        )
