"""Training-step speed and memory: s2_sink (our kernels) vs dense causal attention on SDPA's cuDNN backend.

    python benchmarks/training_speed.py OUTDIR [--lengths 8192,32768] [--models target-20m,llama-1b]
        [--providers sdpa-cudnn,s2_sink,sink-dense,sdpa] [--steps 3] [--budget-s 110]
        [--attention-lengths 32768,8192] [--attention-models target-20m] [--no-profile]

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

Attention-only rows (model ``NAME:attention``, run first): forward + backward of ONE attention layer of that
model's shape (B=1, q/k/v laid out as transformers makes them, (B, S, H, D) memory), per provider of
``ATTENTION_PROVIDERS`` (``s2`` / ``s2_sink`` call ``shifted_sparse_attention`` directly, ``sink-dense`` the
kernel in dense causal mode), median of 10 after 3 warm-up runs; the ratio column is then the attention speed-up
alone. With profiling (default), one profiled run per row writes its top ops to
OUTDIR/attention_profile_NAME_SEQ_PROVIDER.txt: the kernels against the glue around them.

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
ATTENTION_PROVIDERS = ("sdpa-cudnn", "s2_sink", "s2", "sink-dense")
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


def time_calls(call, cuda: bool, steps: int, warmup: int) -> tuple[float, float]:
    """Median ms of ``call()`` over ``steps`` timed calls after ``warmup`` untimed ones (CUDA events around each
    call on CUDA, wall time on CPU), and the peak GiB allocated during the timed calls (0 on CPU)."""
    times = []
    for index in range(warmup + steps):
        if index == warmup and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        call()
        if cuda:
            end.record()
            end.synchronize()
            elapsed = begin.elapsed_time(end)
        else:
            elapsed = (time.perf_counter() - start) * 1e3
        if index >= warmup:
            times.append(elapsed)
    return statistics.median(times), (torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)


def time_steps(model, ids: torch.Tensor, steps: int, warmup: int = 2) -> tuple[float, float, float]:
    """Median ms of a training step over `steps` timed steps, peak GiB (CUDA; 0 on CPU), last loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=ids.is_cuda)
    losses = []

    def step() -> None:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.detach())

    median, peak = time_calls(step, ids.is_cuda, steps, warmup)
    del optimizer
    return median, peak, losses[-1].item()


def attention_call(provider: str):
    """fn(query, key, value) -> (B, S, H, D) contiguous: one attention layer of ``provider`` (ATTENTION_PROVIDERS),
    as the registry function hands it back to the model. query (B, H, S, D); key, value (B, H_kv, S, D)."""
    from hf_longctx.attention.s2 import shifted_sparse_attention
    from hf_longctx.attention.sink import sink_window_attention
    from hf_longctx.config import ShiftedSparseAttention

    if provider == "sdpa-cudnn":
        return lambda q, k, v: sdpa_cudnn_attention(None, q, k, v, None)[0]
    if provider in ("s2", "s2_sink"):
        feature = ShiftedSparseAttention(type=provider)
        return lambda q, k, v: shifted_sparse_attention(q, k, v, feature=feature).transpose(1, 2).contiguous()
    if provider == "sink-dense":
        return lambda q, k, v: sink_window_attention(q, k, v, sink_tokens=0, window=None).transpose(1, 2).contiguous()
    raise ValueError(f"attention provider: unknown {provider!r}; accepted: {', '.join(ATTENTION_PROVIDERS)}")


def time_attention(fn, inputs: list[torch.Tensor], steps: int = 10, warmup: int = 3) -> tuple[float, float]:
    """Median ms of forward + backward of ``fn(*inputs)`` (cotangent: ones), peak GiB (CUDA; 0 on CPU)."""

    def call() -> None:
        out = fn(*inputs)
        torch.autograd.grad(out, inputs, torch.ones_like(out))

    return time_calls(call, inputs[0].is_cuda, steps, warmup)


def profile_attention(fn, inputs: list[torch.Tensor], path: str) -> None:
    """One forward + backward of ``fn(*inputs)`` under torch.profiler; its top 30 ops by device time -> ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if inputs[0].is_cuda else [])
    with profile(activities=activities) as prof:
        out = fn(*inputs)
        torch.autograd.grad(out, inputs, torch.ones_like(out))
        if inputs[0].is_cuda:
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if inputs[0].is_cuda else "self_cpu_time_total"
    with open(path, "w") as out_file:
        out_file.write(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60) + "\n")


def attention_rows(args, device: torch.device, dtype: torch.dtype, info: dict, start: float, emit) -> None:
    """The attention-only rows (see the module docstring), each passed to ``emit`` as soon as it is measured."""
    for seq_len in args.attention_lengths:
        for name in args.attention_models:
            shape = MODELS[name]
            heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
            dim = shape["hidden_size"] // heads
            generator = torch.Generator().manual_seed(seq_len)
            # (B, H, S, D) views of (B, S, H, D) memory, as transformers' attention layers hand them over
            inputs = [torch.randn(1, seq_len, n, dim, generator=generator).to(device, dtype).transpose(1, 2)
                      .requires_grad_() for n in (heads, kv_heads, kv_heads)]
            for provider in ATTENTION_PROVIDERS:
                if time.monotonic() - start > args.budget_s:
                    print(f"budget of {args.budget_s:.0f} s spent: skipping attention {name} {provider} at {seq_len}")
                    continue
                row = {**info, "model": f"{name}:attention", "parameters": 0, "seq_len": seq_len,
                       "provider": provider, "median_ms": None, "tokens_per_s": None, "peak_gib": None, "loss": None,
                       "error": ""}
                try:
                    fn = attention_call(provider)
                    median, peak = time_attention(fn, inputs)
                    row.update(median_ms=round(median, 3), tokens_per_s=round(seq_len / median * 1e3, 1),
                               peak_gib=round(peak, 3))
                    if args.profile:
                        profile_attention(fn, inputs, os.path.join(
                            args.outdir, f"attention_profile_{name}_{seq_len}_{provider}.txt"))
                except Exception as error:  # one failed row must not end the run
                    traceback.print_exc()
                    row["error"] = f"{type(error).__name__}: {error}".replace("\n", " ")
                finally:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                emit(row)


def markdown(rows: list[dict], info: dict, dtype: torch.dtype) -> str:
    lines = [f"# Training-step speed ({info['device']}; torch {info['torch']}, triton {info['triton']}, "
             f"transformers {info['transformers']})", "",
             f"One step = forward + backward + AdamW on B=1 random sequence, {str(dtype).removeprefix('torch.')}; "
             "median of the timed steps; s2_sink groups of S/4 with 4 sinks; llama-1b with gradient checkpointing. "
             "Rows of model NAME:attention: forward + backward of one attention layer of NAME's shape alone.",
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
        parameters = f"{r['parameters'] / 1e6:.1f} M" if r["parameters"] else "-"
        lines.append(f"| {r['model']} | {parameters} | {r['seq_len']} | {r['provider']} | "
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
    parser.add_argument("--attention-lengths", type=_list(int), default=[32768, 8192],
                        help="lengths of the attention-only rows (run first); empty: none")
    parser.add_argument("--attention-models", type=_list(str), default=["target-20m"],
                        help="model shapes of the attention-only rows")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="no profiler table per attention-only row")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    for name in args.models + args.attention_models:
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

        def emit(row: dict) -> None:
            print(row, flush=True)
            writer.writerow(row)
            handle.flush()
            rows.append(row)

        attention_rows(args, device, dtype, info, start, emit)
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
                    emit(row)
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
