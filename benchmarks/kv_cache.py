"""KV cache: decode speed and peak memory of LongCtxCache against DynamicCache and StaticCache.

Model: Llama-3-8B shape (32 layers, hidden 4096, 32 query / 8 key-value heads of 128, MLP 14336,
vocab 128256), random weights, bf16, run through ``model.generate`` (greedy, no EOS, so every run
produces exactly ``max_new_tokens``). Prompts of 8K / 32K / 128K random tokens, batch 1 and 8.

Providers:
- ``dynamic``: transformers' DynamicCache (generate's default), sdpa attention;
- ``static``: StaticCache sized for the run, sdpa; generate compiles its decode step (the best a user
  gets from stock transformers);
- ``longctx``: LongCtxCache without eviction, sdpa: same tokens as ``dynamic``, preallocated buffers
  instead of a per-step ``torch.cat``;
- ``streaming``, ``snapkv``: ``lc.patch(model, kv=...)`` (``longctx_kv`` attention), a budget of 2048
  tokens per layer, prefill in chunks of 8192 tokens so the cache never holds the whole prompt.

Decode ms/token = (t(n2) - t(n1)) / (n2 - n1) from two generate runs that differ only in the number
of new tokens, so the prefill cancels out. Every provider is warmed up first (StaticCache: once per
shape, as it compiles per cache size). Peak memory is ``torch.cuda.max_memory_allocated`` during
the n2 run; "GB/s" counts the bytes a decode step must read at least (weights + stored K/V), so
compare it with the device's copy bandwidth for the floor. Runs whose full K/V cannot fit in free
memory are skipped and say so.

    PYTHONPATH=. python benchmarks/kv_cache.py --out benchmarks/results
    PYTHONPATH=. python benchmarks/kv_cache.py --out /tmp/kv --tiny     # CPU smoke run, tiny shapes

Appends one CSV row per measurement to ``kv_cache.csv`` in ``--out``, rewrites ``kv_cache.md`` and
prints the markdown table last.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

import hf_longctx as lc

LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=131072 + 1024, rope_theta=500000.0,
)
TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096,
)
PROVIDERS = ("dynamic", "static", "longctx", "streaming", "snapkv")
EVICTING = ("streaming", "snapkv")
FIELDS = [
    "time", "device", "torch", "transformers", "triton", "shape", "prompt", "batch", "provider",
    "ms_per_token", "tokens_per_s", "gbps", "peak_gib", "stored_tokens", "note",
]


def versions(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "n/a"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "triton": triton_version}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Run:
    """One provider on one model: builds its cache / patch and times generate."""

    def __init__(self, model, provider: str, budget: int, chunk: int):
        self.model, self.provider, self.budget, self.chunk = model, provider, budget, chunk

    @property
    def label(self) -> str:
        return f"{self.provider}-{self.budget}" if self.provider in EVICTING else self.provider

    def __enter__(self):
        if self.provider in EVICTING:
            feature = lc.KVEviction(policy=self.provider, budget=self.budget, prefill_chunk=self.chunk)
            lc.patch(self.model, kv=feature)
        return self

    def __exit__(self, *exc):
        lc.unpatch(self.model)

    def generate(self, ids: torch.Tensor, new: int, cache_len: int):
        """Greedy generate of ``new`` tokens; returns (seconds, output with the cache)."""
        cache = None
        if self.provider == "static":
            cache = StaticCache(config=self.model.config, max_cache_len=cache_len)
        elif self.provider == "longctx":
            cache = lc.LongCtxCache(self.model, reserve=cache_len)
        device = ids.device
        synchronize(device)
        start = time.perf_counter()
        out = self.model.generate(
            ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=new,
            do_sample=False, return_dict_in_generate=True,
        )
        synchronize(device)
        return time.perf_counter() - start, out


def kv_bytes_per_token(config, dtype) -> int:
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * torch.finfo(dtype).bits // 8


class Recorder:
    def __init__(self, out_dir: str, info: dict, shape: str):
        self.out_dir, self.info, self.shape, self.rows = out_dir, info, shape, []
        self.checks: list[str] = []
        os.makedirs(out_dir, exist_ok=True)
        self.csv_path = os.path.join(out_dir, "kv_cache.csv")
        if not os.path.exists(self.csv_path):
            with open(self.csv_path, "w", newline="") as handle:
                csv.DictWriter(handle, fieldnames=FIELDS).writeheader()

    def add(self, prompt, batch, provider, ms=None, gbps=None, peak=None, stored=None, note=""):
        row = dict(
            self.info, time=datetime.datetime.now().isoformat(timespec="seconds"), shape=self.shape,
            prompt=prompt, batch=batch, provider=provider,
            ms_per_token=None if ms is None else round(ms, 3),
            tokens_per_s=None if ms is None else round(1000 * batch / ms, 1),
            gbps=None if gbps is None else round(gbps, 1),
            peak_gib=None if peak is None else round(peak / 2**30, 2), stored_tokens=stored, note=note,
        )
        self.rows.append(row)
        with open(self.csv_path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=FIELDS).writerow(row)
        print(f"  prompt={prompt:>6} batch={batch} {provider:15s} {row['ms_per_token']} ms/token "
              f"{row['gbps']} GB/s peak {row['peak_gib']} GiB stored {stored} {note}", flush=True)
        with open(os.path.join(self.out_dir, "kv_cache.md"), "w") as handle:
            handle.write(self.markdown())

    def markdown(self) -> str:
        info = self.info
        lines = [
            f"# KV cache decode ({info['device']}; torch {info['torch']}, transformers {info['transformers']}, "
            f"triton {info['triton']})", "", f"{self.shape}; greedy generate; ms/token from two run lengths.", "",
            "| prompt | batch | provider | ms/token | tokens/s | GB/s | peak GiB | stored tokens/layer | "
            "dynamic ms / this | note |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in self.rows:
            base = next((r["ms_per_token"] for r in self.rows if r["provider"] == "dynamic"
                         and r["prompt"] == row["prompt"] and r["batch"] == row["batch"]), None)
            speedup = f"{base / row['ms_per_token']:.2f}x" if base and row["ms_per_token"] else ""
            lines.append(
                f"| {row['prompt']} | {row['batch']} | {row['provider']} | {row['ms_per_token']} | "
                f"{row['tokens_per_s']} | {row['gbps']} | {row['peak_gib']} | {row['stored_tokens']} | {speedup} | "
                f"{row['note']} |"
            )
        if self.checks:
            lines += ["", "Checks before timing:", ""] + [f"- {check}" for check in self.checks]
        return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="results directory (CSV appended, markdown rewritten)")
    parser.add_argument("--prompts", default=None, help="prompt lengths, comma-separated (8192,32768,131072)")
    parser.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"any of {', '.join(PROVIDERS)}")
    parser.add_argument("--new", default="16,80", help="the two numbers of new tokens (n1,n2)")
    parser.add_argument("--budget", type=int, default=None,
                        help="tokens kept per layer by the evicting providers (2048)")
    parser.add_argument("--chunk", type=int, default=None, help="prefill chunk of the evicting providers (8192)")
    parser.add_argument("--tiny", action="store_true", help="tiny model and prompts on the CPU (a smoke run)")
    args = parser.parse_args(argv)

    tiny = args.tiny or not torch.cuda.is_available()
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    prompts = [int(x) for x in (args.prompts or ("256,512" if tiny else "8192,32768,131072")).split(",") if x]
    budget = args.budget or (64 if tiny else 2048)
    chunk = args.chunk or (128 if tiny else 8192)
    batches = [int(x) for x in args.batches.split(",") if x]
    providers = [p for p in args.providers.split(",") if p]
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        raise ValueError(f"--providers: unknown {', '.join(unknown)}; accepted: {', '.join(PROVIDERS)}")
    n1, n2 = (int(x) for x in args.new.split(","))

    config = LlamaConfig(**(TINY if tiny else LLAMA3_8B), bos_token_id=1, eos_token_id=None, pad_token_id=0)
    with torch.device(device):
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token = kv_bytes_per_token(config, dtype)
    shape = (f"{'tiny Llama' if tiny else 'Llama-3-8B shape'}, {str(dtype).removeprefix('torch.')}, "
             f"{config.num_hidden_layers} layers, H={config.num_attention_heads}, H_kv={config.num_key_value_heads}")
    info = versions(device)
    recorder = Recorder(args.out, info, shape)
    print(f"# {info} | {shape} | weights {weights / 2**30:.1f} GiB", flush=True)
    generator = torch.Generator().manual_seed(1)

    def prompt_ids(batch, length):
        return torch.randint(3, config.vocab_size, (batch, length), generator=generator).to(device)

    # Correctness side by side before any timing: without eviction, our cache gives DynamicCache's tokens.
    ids = prompt_ids(1, prompts[0])
    with Run(model, "dynamic", budget, chunk) as run:
        expected = run.generate(ids, n1, prompts[0] + n1)[1].sequences
    for provider in ("longctx", "static"):
        if provider in providers:
            with Run(model, provider, budget, chunk) as run:
                same = torch.equal(run.generate(ids, n1, prompts[0] + n1)[1].sequences, expected)
            recorder.checks.append(f"{provider} greedy tokens == dynamic at prompt {prompts[0]}: {same}")
            print(f"check: {recorder.checks[-1]}", flush=True)

    for batch in batches:
        for length in prompts:
            ids = prompt_ids(batch, length)
            for provider in providers:
                run = Run(model, provider, budget, chunk)
                held = min(length, budget + chunk) if provider in EVICTING else length
                needed = batch * (held + n2) * per_token
                if device.type == "cuda":
                    free = torch.cuda.mem_get_info(device)[0]
                    if needed > free:
                        recorder.add(length, batch, run.label, note=f"skipped: K/V needs {needed / 2**30:.0f} GiB, "
                                     f"{free / 2**30:.0f} GiB free")
                        continue
                try:
                    with run:
                        if provider == "static" or (batch, length) == (batches[0], prompts[0]):
                            run.generate(ids, n1, length + n2)  # warm-up (StaticCache compiles per size)
                        first, _ = run.generate(ids, n1, length + n2)
                        if device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats(device)
                        second, out = run.generate(ids, n2, length + n2)
                    ms = 1000 * (second - first) / (n2 - n1)
                    cache = out.past_key_values
                    stored = cache.stored_lengths[0] if isinstance(cache, lc.LongCtxCache) else length + n2 - 1
                    moved = weights + batch * stored * per_token
                    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
                    recorder.add(length, batch, run.label, ms, moved / ms / 1e6, peak, stored)
                    del out, cache
                except torch.OutOfMemoryError:
                    recorder.add(length, batch, run.label, note="out of memory")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print()
    print(recorder.markdown())


if __name__ == "__main__":
    sys.exit(main())
