"""Dataset Decomposition (Pouransari et al., 2024): documents cut into power-of-two chunks, batched by length.

Each document of ``n`` tokens is cut, front to back, into chunks whose sizes follow the binary expansion of
``n`` (largest first; 13 tokens -> 8 + 4 + 1), chunks longer than ``max_length`` being split into chunks of
``max_length`` and chunks shorter than ``min_length`` dropped. No chunk crosses a document, so no attention
crosses one, and no token is padding. Every batch then holds chunks of one length ``2^i`` only, and holds
``tokens_per_batch / 2^i`` of them, so every optimizer step sees the same number of tokens. A curriculum
weights the buckets over the run (short sequences first, for instance).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch.utils.data import Dataset, Sampler

# Bucket weights: fixed per chunk length, or a function of the epoch's progress in [0, 1).
Curriculum = Mapping[int, float] | Callable[[float], Mapping[int, float]]


def _check_power_of_two(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"{owner}: `{name}` must be a power of two >= 1, got {value!r}")


def decompose(length: int, max_length: int) -> list[int]:
    """Chunk sizes (tokens, powers of two <= ``max_length``, in document order) of a ``length``-token document;
    they sum to ``length``."""
    rest = length % max_length
    return [max_length] * (length // max_length) + [
        1 << bit for bit in range(rest.bit_length() - 1, -1, -1) if rest >> bit & 1
    ]


class DecomposedDataset(Dataset):
    """Documents decomposed into power-of-two chunks; item ``i`` is ``{"input_ids": (L_i,), "labels": (L_i,)}``.

    Args:
        documents: token ids per document (lists or 1-D tensors).
        min_length, max_length: the shortest and longest chunk, in tokens; powers of two, min <= max.
    """

    def __init__(self, documents: Sequence[Sequence[int] | torch.Tensor], min_length: int, max_length: int):
        _check_power_of_two("DecomposedDataset", "min_length", min_length)
        _check_power_of_two("DecomposedDataset", "max_length", max_length)
        if min_length > max_length:
            raise ValueError(f"DecomposedDataset: `min_length` ({min_length}) must be <= `max_length` ({max_length})")
        self.chunks: list[torch.Tensor] = []
        for document in documents:
            ids = torch.as_tensor(document, dtype=torch.long)
            start = 0
            for size in decompose(len(ids), max_length):
                if size >= min_length:
                    self.chunks.append(ids[start : start + size])
                start += size
        self.lengths = [len(chunk) for chunk in self.chunks]

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.chunks[index], "labels": self.chunks[index]}


class LengthBucketBatchSampler(Sampler[list[int]]):
    """Batches of equal-length sequences with a constant token count; the bucket of each batch is drawn at random.

    A bucket of length ``L`` gives batches of ``tokens_per_batch // L`` sequences (its last, incomplete batch is
    dropped, so every batch has exactly ``tokens_per_batch`` tokens). The next batch comes from bucket ``L`` with
    probability proportional to ``weight(L) * batches left in L``: without a curriculum (all weights 1) every
    order of the epoch's batches is equally likely; a weight of 0 holds a bucket back until the others run out.
    An epoch yields every full batch once.

    Args:
        lengths: the length (tokens) of every dataset item; powers of two, each <= ``tokens_per_batch``.
        tokens_per_batch: tokens per batch; a power of two.
        curriculum: bucket weights by length (missing lengths weigh 1), or a function from the epoch's
            progress in [0, 1) (batches yielded / batches in the epoch) to such weights.
        seed: base seed; the epoch's order is drawn from ``seed + epoch`` (see ``set_epoch``).
    """

    def __init__(self, lengths: Sequence[int], tokens_per_batch: int, curriculum: Curriculum | None = None,
                 seed: int = 0):
        owner = "LengthBucketBatchSampler"
        _check_power_of_two(owner, "tokens_per_batch", tokens_per_batch)
        self.buckets: dict[int, list[int]] = {}
        for index, length in enumerate(lengths):
            if isinstance(length, bool) or not isinstance(length, int) or length < 1 or length & (length - 1) or (
                length > tokens_per_batch
            ):
                raise ValueError(
                    f"{owner}: `lengths` must be powers of two <= tokens_per_batch ({tokens_per_batch}); item "
                    f"{index} has length {length!r}"
                )
            self.buckets.setdefault(length, []).append(index)
        self.tokens_per_batch = tokens_per_batch
        self.curriculum = curriculum
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the next iteration's order from ``seed + epoch`` (the Trainer calls this every epoch)."""
        self.epoch = epoch

    def batch_size(self, length: int) -> int:
        """Sequences per batch of the bucket of ``length``-token sequences."""
        return self.tokens_per_batch // length

    def __len__(self) -> int:
        return sum(len(indices) // self.batch_size(length) for length, indices in self.buckets.items())

    def _weights(self, progress: float) -> Mapping[int, float]:
        if self.curriculum is None:
            return {}
        return self.curriculum(progress) if callable(self.curriculum) else self.curriculum

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        pending = {}  # length -> list of batches (index lists) not yet yielded, in the order they will go
        for length, indices in sorted(self.buckets.items()):
            size = self.batch_size(length)
            order = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
            pending[length] = [order[i : i + size] for i in range(0, len(order) - size + 1, size)]
        total = len(self)
        for step in range(total):
            lengths = [length for length, batches in pending.items() if batches]
            left = torch.tensor([float(len(pending[length])) for length in lengths])
            weights = self._weights(step / total)
            if any(weight < 0 for weight in weights.values()):
                raise ValueError(f"LengthBucketBatchSampler: `curriculum` weights must be >= 0, got {dict(weights)}")
            odds = left * torch.tensor([float(weights.get(length, 1.0)) for length in lengths])
            if odds.sum() <= 0:  # every bucket left weighs 0: drain them in proportion to their batches
                odds = left
            length = lengths[int(torch.multinomial(odds, 1, generator=generator))]
            yield pending[length].pop()
