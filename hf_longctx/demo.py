"""``hf-longctx demo``: stock vs patched quality and memory past a model's own window.

The model is the project's trained reference target (``model_cards/longctx-target-20m`` in the
repository) when it is there, else a tiny random Llama, and the output says which. Perplexity is
measured on held-out text for the trained model, on random tokens for the random one (where it only
shows that the patch runs, not quality).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from .config import SinkAttention
from .eval.perplexity import heldout_windows, window_nll
from .memory import measure_peak_memory
from .patching import from_pretrained, patch, unpatch

REFERENCE_MODEL = Path("model_cards") / "longctx-target-20m"


@dataclass
class DemoRow:
    setting: str
    length: int
    multiple: float
    perplexity: float
    peak_mib: float | None
    seconds: float


def tiny_random_model() -> LlamaForCausalLM:
    """A small random Llama whose stated window (max_position_embeddings) is 256 tokens."""
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()


def run_demo(model_path: str | None = None, multiples: tuple[float, ...] = (1, 4)) -> list[DemoRow]:
    """Measure stock and sink/window attention at each multiple of the model's window."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = Path(model_path) if model_path else REFERENCE_MODEL
    if path.is_dir():
        model = from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa").to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        print(f"Model: {path} (trained reference model); text: held-out validation documents")
    else:
        if model_path:
            raise ValueError(f"`model_path` {model_path!r} is not a directory")
        model = tiny_random_model().to(device)
        tokenizer = None
        print(
            "Model: a tiny RANDOM Llama (the trained reference model is not in this checkout), on random "
            "tokens: the perplexities below say nothing about quality, only that the patch runs."
        )
    window = model.config.max_position_embeddings
    lengths = [int(window * m) for m in multiples]
    longest = max(lengths)
    if tokenizer is not None:
        ids = heldout_windows(tokenizer, [longest], num_samples=1)[1][longest]
    else:
        ids = torch.randint(0, model.config.vocab_size, (1, longest), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)

    sink = SinkAttention(sink_tokens=4, window=window)
    rows = []
    for setting in ("stock", f"sink ({sink.sink_tokens} sinks + window {sink.window})"):
        if setting != "stock":
            patch(model, attention=sink)
        for length in lengths:
            start = time.perf_counter()
            with measure_peak_memory(device) as peak:
                ppl = math.exp(window_nll(model, ids[:, :length]).item())
            rows.append(DemoRow(setting, length, length / window, ppl, peak.peak_mib, time.perf_counter() - start))
    unpatch(model)
    return rows


def format_table(rows: list[DemoRow]) -> str:
    lines = [
        "| attention | tokens | x window | perplexity | peak memory (MiB) | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        memory = "n/a" if row.peak_mib is None else f"{row.peak_mib:.0f}"
        lines.append(
            f"| {row.setting} | {row.length} | {row.multiple:g} | {row.perplexity:.2f} | {memory} | {row.seconds:.2f} |"
        )
    return "\n".join(lines)


def main(model_path: str | None = None) -> None:
    rows = run_demo(model_path)
    print()
    print(format_table(rows))
    print(
        "\nPeak memory: CUDA allocator peak on a GPU, else the process's peak resident set above its level "
        "before each forward pass."
    )
