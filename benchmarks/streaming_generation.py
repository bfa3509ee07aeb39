"""Streaming generation on the reference target (issue 4): 100K generated tokens in constant KV memory, and the
perplexity of a 100K-token held-out stream read through the same streaming cache.

Patch: ``lc.patch(model, attention=ATTENTION, kv=KV)``, by default ``sink:1020,4,positions=cache`` (StreamingLLM:
4 sinks + a 1020-token window, positions counted inside the cache, so none exceeds the trained 1023) and
``streaming:every=16`` (its budget taken from the attention: 4 + 1020 - 1 tokens per layer, evicting every 16
tokens, so a query sees the same keys as with every=1 while the compaction runs 16x less often). bf16 on CUDA.
The prompt (``--prompt-tokens`` of held-out text) is longer than the budget, so memory is flat from the start.

What it measures, and why these measures:

1. Quality: the perplexity of held-out text (the validation split of ``hf_longctx.eval.corpus``, documents
   joined with EOS, repeated if they hold fewer than ``--ppl-tokens``: a repeat lies tens of thousands of
   tokens back, far outside the window, so it cannot be copied) read ``--chunk`` tokens per forward through
   the streaming cache: every token is predicted from the sinks and the window, exactly as during
   generation, and its NLL is against real text. The NLL of the model's own generated tokens would only say
   how sure the model is of itself. The stock model reads the same stream with a full cache for comparison.
2. Memory: ``torch.cuda.max_memory_allocated`` and ``memory_allocated`` every ``--probe-every`` generated
   tokens, (a) through ``model.generate`` (greedy) for ``--eager-tokens``, and (b) for ``--new-tokens`` with a
   greedy loop over the library's static one-token steps (``hf_longctx.cache.GraphDecoder``), replayed as a CUDA
   graph between the eager eviction steps (``--no-cuda-graphs``: every step eager). The graphs remove the
   per-token Python and launch overhead of the 20M-parameter model, which would otherwise dominate; they hold
   the same cache, eviction and attention code (the default ``positions=cache`` too: the kernel takes the key
   spans from the device). Peak memory is reset at the start of each run. (On the H100, the earlier per-phase
   graphs of this script: 1.47 ms per token; ``model.generate``: 19 ms.)

Writes ``OUT/streaming_generation.md`` (summary and tables, device and versions), ``_memory.csv`` (one row per
probe), ``_ppl.csv`` (one row per ``--bucket`` tokens of the stream) and ``.png`` (memory over generated tokens;
perplexity over the stream position). Estimated on an H100 with the defaults: 4-5 minutes (from a run of an
earlier version with one graph); a generation run that passes ``--max-minutes`` stops and says how far it got.

    PYTHONPATH=. python benchmarks/streaming_generation.py --out benchmarks/results/streaming_generation
    PYTHONPATH=. python benchmarks/streaming_generation.py --out /tmp/stream-cpu --device cpu --dtype float32 \\
        --attention sink:60,4,positions=cache --prompt-tokens 100 --new-tokens 300 --eager-tokens 200 \\
        --probe-every 50 --ppl-tokens 3000 --chunk 256 --bucket 500    # CPU smoke run
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, StoppingCriteria

import hf_longctx as lc
from hf_longctx.cache import GraphDecoder
from hf_longctx.eval import report
from hf_longctx.eval.corpus import iter_documents
from hf_longctx.eval.perplexity import logits_from_hidden

MIB = 2**20


class MemoryProbe:
    """Rows (run, generated tokens, CUDA max allocated / allocated MiB, KV buffers MiB, stored tokens, seconds).

    The KV buffers are what the cache holds (every layer's key and value tensors, capacity included); CUDA
    memory also counts the weights, activations and, under ``generate``, its growing token ids (8 bytes per
    token) and attention mask.
    """

    def __init__(self, device: torch.device, every: int):
        self.device, self.every = device, every
        self.rows: list[dict] = []

    def record(self, run: str, generated: int, started: float, cache: lc.LongCtxCache) -> None:
        cuda = self.device.type == "cuda"
        buffers = [t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None]
        self.rows.append({
            "run": run,
            "generated_tokens": generated,
            "max_allocated_mib": round(torch.cuda.max_memory_allocated(self.device) / MIB, 2) if cuda else None,
            "allocated_mib": round(torch.cuda.memory_allocated(self.device) / MIB, 2) if cuda else None,
            "kv_buffers_mib": round(sum(t.numel() * t.element_size() for t in buffers) / MIB, 3),
            "stored_tokens": max(cache.stored_lengths),
            "seconds": round(time.perf_counter() - started, 2),
        })


class ProbeCriteria(StoppingCriteria):
    """Records memory every ``probe.every`` generated tokens during ``generate``; stops past ``deadline``."""

    def __init__(self, probe: MemoryProbe, cache, prompt: int, deadline: float, started: float):
        self.probe, self.cache, self.prompt, self.deadline, self.started = probe, cache, prompt, deadline, started
        self.stopped_early = False

    def __call__(self, input_ids, scores, **kwargs):
        generated = input_ids.shape[1] - self.prompt
        if generated % self.probe.every == 0:
            self.probe.record("generate", generated, self.started, self.cache)
        stop = time.perf_counter() > self.deadline
        self.stopped_early |= stop
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def heldout_stream(tokenizer, tokens: int) -> tuple[torch.Tensor, int]:
    """(``tokens`` ids: BOS, then the validation documents joined with EOS, repeated as needed; the number of
    distinct tokens before the first repeat)."""
    pieces = []
    for document in iter_documents("validation"):
        pieces += tokenizer(document.text, add_special_tokens=False, verbose=False)["input_ids"]
        pieces.append(tokenizer.eos_token_id)
    prefix = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    repeats = math.ceil(max(0, tokens - len(prefix)) / len(pieces))
    return torch.tensor((prefix + pieces * repeats)[:tokens]), len(prefix) + len(pieces)


@torch.no_grad()
def stream_nll(model, stream: torch.Tensor, chunk: int, cache) -> torch.Tensor:
    """(N - 1,) float32 NLL (nats) of every next token of ``stream``, read ``chunk`` tokens per forward."""
    ids = stream.to(model.device)[None]
    losses = []
    for start in range(0, ids.shape[1] - 1, chunk):
        hidden = model.base_model(input_ids=ids[:, start : start + chunk], past_key_values=cache,
                                  use_cache=True).last_hidden_state[0]
        targets = ids[0, start + 1 : start + 1 + chunk]
        logits = logits_from_hidden(model, hidden[None, : targets.shape[0]])[0]
        losses.append(F.cross_entropy(logits, targets, reduction="none"))
    return torch.cat(losses).float().cpu()


def bucket_perplexity(nll: torch.Tensor, bucket: int) -> list[tuple[int, int, float]]:
    """(first token, last token + 1, perplexity) of each ``bucket`` predicted tokens."""
    return [(start, min(start + bucket, len(nll)), math.exp(nll[start : start + bucket].mean().item()))
            for start in range(0, len(nll), bucket)]


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def generate_eager(model, prompt: torch.Tensor, tokens: int, probe: MemoryProbe, deadline: float) -> dict:
    """``model.generate`` (greedy) of ``tokens`` new tokens, probing memory; its tokens and timing."""
    reset_peak(model.device)
    started = time.perf_counter()
    cache = lc.LongCtxCache(model, kv=lc.patched_config(model).kv)
    criteria = ProbeCriteria(probe, cache, prompt.shape[1], deadline, started)
    sequences = model.generate(prompt, past_key_values=cache, max_new_tokens=tokens, min_new_tokens=tokens,
                               do_sample=False, stopping_criteria=[criteria])
    generated = sequences.shape[1] - prompt.shape[1]
    seconds = time.perf_counter() - started
    if generated % probe.every:
        probe.record("generate", generated, started, cache)
    return {"tokens": sequences[0, prompt.shape[1] :].cpu(), "seconds": seconds, "generated": generated,
            "stored": max(cache.stored_lengths), "stopped_early": criteria.stopped_early}


@torch.no_grad()
def decode_loop(model, prompt: torch.Tensor, tokens: int, probe: MemoryProbe, deadline: float, graphs: bool) -> dict:
    """Greedy decoding of ``tokens`` new tokens through the library's static one-token steps
    (``hf_longctx.cache.GraphDecoder``), replayed as CUDA graphs when ``graphs`` (the decoder runs a step eagerly
    where a graph cannot stand for it, the evictions; the note says how many steps each way)."""
    device = model.device
    reset_peak(device)
    cache = lc.LongCtxCache(model, kv=lc.patched_config(model).kv, cuda_graphs=True)
    started = time.perf_counter()
    logits = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
    generated = torch.empty(tokens, dtype=torch.long, device=device)
    position = torch.full((1,), prompt.shape[1] - 1, dtype=torch.long, device=device)
    decoder = GraphDecoder(model, cache, graphs=graphs)
    decoder.start(tokens)
    done = 0
    while done < tokens:
        next_ids = logits.argmax(-1)
        generated[done : done + 1] = next_ids
        done += 1
        if done % probe.every == 0:
            probe.record("loop", done, started, cache)
            if time.perf_counter() > deadline:
                break
        if done < tokens:
            position += 1
            logits = decoder.step(next_ids, position)
    decoder.stop()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    if done % probe.every:
        probe.record("loop", done, started, cache)
    note = (f"CUDA graphs: {decoder.replays} steps replayed, {decoder.eager_steps} eager, {decoder.captures} "
            f"capture(s)" if decoder.replays else "eager static steps")
    return {"tokens": generated[:done].cpu(), "seconds": seconds, "generated": done,
            "stored": max(cache.stored_lengths), "stopped_early": done < tokens, "note": note}


def plot(path: Path, probe_rows: list[dict], buckets: dict[str, list], title: str) -> None:
    """Two panels: memory (MiB) over generated tokens per run; perplexity over the stream position per model."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), dpi=120)
    memory, quality = fig.subplots(1, 2)
    for run in dict.fromkeys(row["run"] for row in probe_rows):
        rows = [row for row in probe_rows if row["run"] == run and row["max_allocated_mib"] is not None]
        if rows:
            tokens = [row["generated_tokens"] for row in rows]
            memory.plot(tokens, [row["max_allocated_mib"] for row in rows], label=f"{run}: max")
            memory.plot(tokens, [row["allocated_mib"] for row in rows], "--", label=f"{run}: current")
    memory.set_xlabel("generated tokens")
    memory.set_ylabel("CUDA memory allocated (MiB)")
    memory.set_title("Memory during streaming generation")
    memory.set_ylim(bottom=0)
    for name, rows in buckets.items():
        quality.plot([(a + b) / 2 for a, b, _ in rows], [p for _, _, p in rows], marker=".", label=name)
    quality.set_yscale("log")
    quality.set_xlabel("position in the held-out stream (tokens)")
    quality.set_ylabel("perplexity (per bucket)")
    quality.set_title("Held-out perplexity over the stream")
    for ax in (memory, quality):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="results directory")
    parser.add_argument("--model", default="model_cards/longctx-target-20m")
    parser.add_argument("--attention", default="sink:1020,4,positions=cache")
    parser.add_argument("--kv", default="streaming:every=16", help="eviction every 16 tokens amortises the compaction")
    parser.add_argument("--prompt-tokens", type=int, default=1088, help="held-out prompt; past the budget, the "
                        "cache evicts from the first generated token")
    parser.add_argument("--new-tokens", type=int, default=100_000, help="tokens of the long generation run")
    parser.add_argument("--eager-tokens", type=int, default=1500, help="tokens generated through model.generate")
    parser.add_argument("--probe-every", type=int, default=1000, help="generated tokens between memory probes")
    parser.add_argument("--ppl-tokens", type=int, default=100_000, help="length of the held-out stream")
    parser.add_argument("--chunk", type=int, default=512, help="stream tokens per forward")
    parser.add_argument("--bucket", type=int, default=5000, help="stream tokens per perplexity point")
    parser.add_argument("--no-stock", action="store_true", help="skip the stock model's pass over the stream")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="decode the long run eagerly")
    parser.add_argument("--max-minutes", type=float, default=8.0, help="stop a generation run past this")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    begun = time.perf_counter()
    deadline = begun + 60 * args.max_minutes

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    stream, distinct = heldout_stream(tokenizer, args.ppl_tokens)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, device_map=device).eval()
    buckets = {}
    if not args.no_stock:
        nll = stream_nll(model, stream, args.chunk, DynamicCache(config=model.config))
        buckets["stock (full cache)"] = bucket_perplexity(nll, args.bucket)
    lc.patch(model, attention=args.attention, kv=args.kv)
    config = lc.patched_config(model)
    nll = stream_nll(model, stream, args.chunk, lc.LongCtxCache(model, kv=config.kv))
    streaming_name = f"attention={args.attention}, kv={args.kv}"
    buckets[streaming_name] = bucket_perplexity(nll, args.bucket)
    streaming_ppl = math.exp(nll.mean().item())
    print(f"held-out stream: {len(stream)} tokens (validation split: {distinct}), streaming perplexity "
          f"{streaming_ppl:.3f}", flush=True)

    probe = MemoryProbe(device, args.probe_every)
    prompt = heldout_stream(tokenizer, args.prompt_tokens)[0][None].to(device)
    eager = generate_eager(model, prompt, args.eager_tokens, probe, deadline)
    print(f"generate: {eager['generated']} tokens in {eager['seconds']:.1f}s", flush=True)
    long_run = decode_loop(model, prompt, args.new_tokens, probe, deadline, graphs=not args.no_cuda_graphs)
    print(f"loop ({long_run['note']}): {long_run['generated']} tokens in {long_run['seconds']:.1f}s", flush=True)
    if eager["stopped_early"] or long_run["stopped_early"]:
        print(f"stopped early: --max-minutes {args.max_minutes} reached", flush=True)
    compared = min(len(eager["tokens"]), len(long_run["tokens"]))
    same = int((eager["tokens"][:compared] == long_run["tokens"][:compared]).cumprod(0).sum())

    at = {row["generated_tokens"]: row for row in probe.rows if row["run"] == "loop"}
    checkpoint = ""
    if 10_000 in at and args.new_tokens in at and at[10_000]["max_allocated_mib"] is not None:
        early, late = at[10_000], at[args.new_tokens]
        ratio = late["max_allocated_mib"] / early["max_allocated_mib"]
        checkpoint = (f"Greedy loop: max_memory_allocated after 10K generated tokens {early['max_allocated_mib']:.1f} "
                      f"MiB, after {args.new_tokens // 1000}K {late['max_allocated_mib']:.1f} MiB (ratio {ratio:.4f}: "
                      f"{'within' if abs(ratio - 1) <= 0.05 else 'NOT within'} 5%); KV buffers "
                      f"{early['kv_buffers_mib']:.2f} and {late['kv_buffers_mib']:.2f} MiB.")
    cuda_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    versions = installed_versions("torch", "transformers", "triton")
    first, last = buckets[streaming_name][0], buckets[streaming_name][-1]
    repeated = f" (the {distinct} tokens of the validation split, repeated)" if len(stream) > distinct else ""
    summary_rows = [
        ["model.generate (greedy)", eager["generated"], f"{eager['seconds']:.1f}",
         f"{1000 * eager['seconds'] / max(1, eager['generated']):.2f}", eager["stored"]],
        [f"greedy loop ({long_run['note']})", long_run["generated"], f"{long_run['seconds']:.1f}",
         f"{1000 * long_run['seconds'] / max(1, long_run['generated']):.3f}", long_run["stored"]],
    ]
    ppl_rows = [[name, *(f"{p:.2f}" for _, _, p in rows)] for name, rows in buckets.items()]
    markdown = "\n".join([
        "# Streaming generation on longctx-target-20m (trained at 1024 tokens)",
        "",
        f"Device {cuda_name}, {args.dtype}, versions {versions}. Patch: `attention={args.attention}`, "
        f"`kv={args.kv}` -> {config.to_dict()}.",
        "",
        "## Memory",
        "",
        checkpoint or "(the 10K / final checkpoints were not both reached; see the CSV)",
        "",
        report.markdown_table(["run", "generated tokens", "seconds", "ms / token", "stored tokens per layer"],
                              summary_rows),
        "",
        f"The greedy loop repeats the tokens of `model.generate` for the first {same} of {compared} tokens "
        "(same weights, same cache; they part where bf16 rounding of two code paths ties differently).",
        "",
        "## Held-out perplexity through the streaming cache",
        "",
        f"{len(stream)} tokens of held-out text{repeated}, {args.chunk} tokens per forward: perplexity "
        f"{streaming_ppl:.3f} overall; {first[2]:.2f} over tokens {first[0]}-{first[1]}, {last[2]:.2f} over "
        f"{last[0]}-{last[1]}. Per {args.bucket}-token bucket (columns: its first token):",
        "",
        report.markdown_table(["model"] + [str(a) for a, _, _ in buckets[streaming_name]], ppl_rows),
        "",
        f"Total time {time.perf_counter() - begun:.0f}s.",
    ])
    write_csv(out / "streaming_generation_memory.csv", probe.rows)
    write_csv(out / "streaming_generation_ppl.csv", [
        {"model": name, "first_token": a, "end_token": b, "perplexity": round(p, 4)}
        for name, rows in buckets.items() for a, b, p in rows
    ])
    (out / "streaming_generation.md").write_text(markdown + "\n")
    plot(out / "streaming_generation.png", probe.rows, buckets,
         f"longctx-target-20m, attention={args.attention}, kv={args.kv} ({cuda_name})")
    print(f"\n{markdown}\n\nwrote {out}/streaming_generation.{{md,png}}, streaming_generation_{{memory,ppl}}.csv")
    return 0


def installed_versions(*names: str) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


if __name__ == "__main__":
    sys.exit(main())
