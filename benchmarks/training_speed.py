"""Training-step speed and memory: s2_sink (our kernels) vs dense causal attention on SDPA's cuDNN backend.

    python benchmarks/training_speed.py OUTDIR [--lengths 8192,32768] [--models target-20m,llama-1b]
        [--providers sdpa-cudnn,s2_sink,sink-dense,sdpa] [--steps 3] [--budget-s 110]

One training step = forward + backward + AdamW step (fused on CUDA) on one random sequence (B=1, labels =
inputs) of a randomly initialised Llama-shaped model in bf16. Every provider runs the same model (its
weights, not re-initialised) and the same batch:
- ``sdpa-cudnn``: stock-equivalent dense causal attention, K/V repeated for GQA (as transformers' sdpa path
  does when it does not pass ``enable_gqa``), ``scaled_dot_product_attention(is_causal=True)`` forced onto
  the cuDNN backend; the best dense kernel measured on the H100 (BENCHMARKING.md).
- ``s2_sink``: ``lc.patch(model, attention="s2_sink")`` (SinkLoRA's shifted sparse attention, groups of S/4,
  4 sink tokens), our Triton kernel forward and backward.
- ``sink-dense``: ``lc.patch(model, attention="sink:S")``: our kernel in dense causal mode (window = S).
- ``sdpa``: transformers' own ``"sdpa"`` attention (``enable_gqa``, PyTorch's backend choice), for reference.
Models: ``target-20m`` is the reference target's architecture (6 layers, hidden 512, 8 heads, 2 KV heads,
head dim 64, vocab 8192; attention dominates at 32K); ``llama-1b`` is TinyLlama's shape (22 layers, hidden
2048, 32 heads, 4 KV heads, head dim 64, MLP 5632, vocab 32000; 1.1 B parameters) with gradient checkpointing.

Timing: CUDA events around each whole step, the median of ``--steps`` steps after two warm-up steps (Triton
compiles and autotunes there). Peak memory: ``torch.cuda.max_memory_allocated`` over the timed steps.
Rows run in priority order (32K first) and stop once ``--budget-s`` seconds have passed. Each measurement is
appended to OUTDIR/training_speed.csv as soon as it exists (with device and versions); the markdown table
(OUTDIR/training_speed.md, also printed) has tokens/s and the s2_sink / sdpa-cudnn ratio.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hf_longctx as lc  # noqa: E402

SDPA_CUDNN = "bench_sdpa_cudnn"
MODELS = {
    "target-20m": dict(hidden_size=512, intermediate_size=1344, num_hidden_layers=6, num_attention_heads=8,
                       num_key_value_heads=2, vocab_size=8192, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
}
CHECKPOINTED = {"llama-1b"}
PROVIDERS = ("sdpa-cudnn", "s2_sink", "sink-dense", "sdpa")
FIELDS = ["device", "torch", "triton", "transformers", "model", "parameters", "seq_len", "provider", "median_ms",
          "tokens_per_s", "peak_gib", "loss", "error"]


def sdpa_cudnn_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Dense causal attention through SDPA's cuDNN backend (CPU: the default backend), K/V repeated for GQA.

    query: (B, H, S, D); key, value: (B, H_kv, S, D). Returns ((B, S, H, D) contiguous, None).
    """
    if attention_mask is not None:
        raise ValueError(f"{SDPA_CUDNN}: unpadded batches only, got an attention_mask")
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    backends = [SDPBackend.CUDNN_ATTENTION] if query.is_cuda else [SDPBackend.MATH]
    with sdpa_kernel(backends):
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None


def versions(device: torch.device) -> dict:
    import triton

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return {"device": name, "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__}


def build_model(name: str, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """A randomly initialised Llama of shape ``MODELS[name]`` on ``device`` (initialised there), in training mode."""
    config = LlamaConfig(**MODELS[name], max_position_embeddings=131072, use_cache=False)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, attn_implementation=SDPA_CUDNN, dtype=dtype)
    if name in CHECKPOINTED:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def set_provider(model: LlamaForCausalLM, provider: str, seq_len: int) -> None:
    lc.unpatch(model)
    model.set_attn_implementation("sdpa" if provider == "sdpa" else SDPA_CUDNN)
    if provider == "s2_sink":
        lc.patch(model, attention="s2_sink")
    elif provider == "sink-dense":
        lc.patch(model, attention=f"sink:{seq_len}")
    elif provider not in ("sdpa-cudnn", "sdpa"):
        raise ValueError(f"provider: unknown {provider!r}; accepted: {', '.join(PROVIDERS)}")


def time_steps(model, ids: torch.Tensor, steps: int, warmup: int = 2) -> tuple[float, float, float]:
    """Median ms of a training step over `steps` timed steps, peak GiB (CUDA; 0 on CPU), last loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=ids.is_cuda)
    cuda = ids.is_cuda
    times, loss = [], float("nan")
    for index in range(warmup + steps):
        if index == warmup and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            end.record()
            end.synchronize()
            elapsed = begin.elapsed_time(end)
        else:
            elapsed = (time.perf_counter() - start) * 1e3
        loss = out.loss.item()
        if index >= warmup:
            times.append(elapsed)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    del optimizer
    return statistics.median(times), peak, loss


def markdown(rows: list[dict], info: dict, dtype: torch.dtype) -> str:
    lines = [f"# Training-step speed ({info['device']}; torch {info['torch']}, triton {info['triton']}, "
             f"transformers {info['transformers']})", "",
             f"One step = forward + backward + AdamW on B=1 random sequence, {str(dtype).removeprefix('torch.')}; "
             "median of the timed steps; s2_sink groups of S/4 with 4 sinks; llama-1b with gradient checkpointing.",
             "",
             "| model | parameters | seq_len | provider | median ms | tokens/s | peak GiB | tokens/s vs sdpa-cudnn |",
             "|---|---|---|---|---|---|---|---|"]
    base = {(r["model"], r["seq_len"]): r["tokens_per_s"] for r in rows
            if r["provider"] == "sdpa-cudnn" and r["tokens_per_s"]}
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['model']} | {r['parameters']} | {r['seq_len']} | {r['provider']} | error: "
                         f"{r['error'][:80]} | | | |")
            continue
        ref = base.get((r["model"], r["seq_len"]))
        ratio = f"{r['tokens_per_s'] / ref:.2f}x" if ref else ""
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.1f} M | {r['seq_len']} | {r['provider']} | "
                     f"{r['median_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.2f} | {ratio} |")
    return "\n".join(lines) + "\n"


def _list(cast):
    return lambda text: [cast(item) for item in text.split(",") if item]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", help="folder for training_speed.csv and training_speed.md")
    parser.add_argument("--lengths", type=_list(int), default=[32768, 8192], help="sequence lengths, in run order")
    parser.add_argument("--models", type=_list(str), default=["target-20m", "llama-1b"])
    parser.add_argument("--providers", type=_list(str), default=list(PROVIDERS))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--budget-s", type=float, default=110.0, help="start no measurement after this many s")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    for name in args.models:
        if name not in MODELS:
            parser.error(f"--models: unknown {name!r}; accepted: {', '.join(MODELS)}")
    for name in args.providers:
        if name not in PROVIDERS:
            parser.error(f"--providers: unknown {name!r}; accepted: {', '.join(PROVIDERS)}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    start = time.monotonic()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    AttentionInterface.register(SDPA_CUDNN, sdpa_cudnn_attention)
    AttentionMaskInterface.register(SDPA_CUDNN, flash_attention_mask)
    info = versions(device)
    os.makedirs(args.outdir, exist_ok=True)
    csv_path = os.path.join(args.outdir, "training_speed.csv")
    new_file = not os.path.exists(csv_path)
    rows = []
    with open(csv_path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        for seq_len in args.lengths:
            for name in args.models:
                if time.monotonic() - start > args.budget_s:
                    print(f"budget of {args.budget_s:.0f} s spent: skipping {name} at {seq_len}")
                    continue
                model = build_model(name, device, dtype)
                parameters = sum(p.numel() for p in model.parameters())
                ids = torch.randint(0, model.config.vocab_size, (1, seq_len),
                                    generator=torch.Generator().manual_seed(seq_len)).to(device)
                for provider in args.providers:
                    if time.monotonic() - start > args.budget_s:
                        print(f"budget of {args.budget_s:.0f} s spent: skipping {name} {provider} at {seq_len}")
                        continue
                    row = {**info, "model": name, "parameters": parameters, "seq_len": seq_len, "provider": provider,
                           "median_ms": None, "tokens_per_s": None, "peak_gib": None, "loss": None, "error": ""}
                    try:
                        set_provider(model, provider, seq_len)
                        median, peak, loss = time_steps(model, ids, args.steps)
                        row.update(median_ms=round(median, 2), tokens_per_s=round(seq_len / median * 1e3, 1),
                                   peak_gib=round(peak, 3), loss=round(loss, 4))
                    except Exception as error:  # one failed row (OOM, a missing backend) must not end the run
                        traceback.print_exc()
                        row["error"] = f"{type(error).__name__}: {error}".replace("\n", " ")
                    finally:
                        lc.unpatch(model)
                        model.zero_grad(set_to_none=True)
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    print(row, flush=True)
                    writer.writerow(row)
                    handle.flush()
                    rows.append(row)
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    table = markdown(rows, info, dtype)
    with open(os.path.join(args.outdir, "training_speed.md"), "w") as out:
        out.write(table)
    print(table)
    return rows


if __name__ == "__main__":
    main()
