"""KV cache (issue 5): decode speed and memory of LongCtxCache against DynamicCache and StaticCache.

Model: Llama-3-8B shape (32 layers, hidden 4096, 32 query / 8 key-value heads of 128, MLP 14336,
vocab 128256), random weights, bf16, sdpa, run through ``model.generate`` (greedy, no EOS, so every run
produces exactly ``--new`` tokens). Random-token prompts of 8K / 32K / 128K, batch 1 and 8; rows whose
memory estimate exceeds the free GPU memory (batch 8 at 128K: 128 GiB of K/V) are skipped and say so.

Providers (a row each):
- ``dynamic``: transformers' DynamicCache (generate's default): ``torch.cat`` on every step;
- ``static``: StaticCache sized for the run; generate compiles its decode step, the best a user gets from
  stock transformers. Only at ``--static-prompts`` (batch 1): the compile takes about a minute per cache
  size. A warm-up generate with a short prompt on the same cache compiles it (then ``cache.reset()``), so
  the timed run reuses that compile; its prefill runs in chunks of ``--static-prefill-chunk``
  (generate's stock ``prefill_chunk_size``), as an unchunked StaticCache prefill builds a
  (prompt x cache) 4D mask, 16 GiB at 128K;
- ``longctx``: ``LongCtxCache(model, reserve=prompt + new)``, no eviction, sdpa: the same tokens as
  ``dynamic`` (column "same tokens"), preallocated buffers instead of the per-step ``torch.cat``;
- ``POLICY:BUDGET,every=N`` (``snapkv:4096,every=64``, ``snapkv:2048,every=64``, and ``--variants`` at the
  longest prompt, ``snapkv:4096`` evicting at every step among them):
  ``lc.patch(model, kv=...)`` (``longctx_kv`` attention), prefill in chunks of ``--chunk`` tokens so the cache
  never holds the whole prompt;
- ``longctx+graphs`` and ``POLICY:BUDGET,every=N+graphs`` (``--graphs``, on by default on the GPU): the same caches
  (``cuda_graphs=True``) and the ``longctx_kv`` attention, decoded by ``lc.graph_generate``: one-token steps
  replayed as a CUDA graph (``hf_longctx.cache.graphs``), evictions eager between replays. The acceptance checks
  read these rows where they were measured (the eager rows stay in the table).

Measures, per row, from ONE generate run:
- decode ms/token: the median interval between consecutive generated tokens (a stopping criterion
  synchronises and takes the time after each token; generate synchronises on every step anyway), so the
  prefill does not count and compile / CUDA-graph warm-up steps fall out of the median;
- the bandwidth floor: (weight bytes + K/V bytes a step must read) / ``--bandwidth`` (the measured copy
  bandwidth: 3.0 TB/s on the H100, 4.3 TB/s on the H200, BENCHMARKING.md), and ms / floor;
- KV GiB: the cache's buffers (keys, values and per-slot metadata, allocated capacity included), the peak
  over every forward of the run (prefill chunks included) and at the end (the decoding steady state);
- peak GiB: ``torch.cuda.max_memory_allocated`` over the run (weights included).

Then the acceptance ratios (second table), and the chunked-prefill memory table: ``generate`` of one token
with ``snapkv`` eviction at the two longest prompts, for each ``--prefill-grid`` (chunk, budget): the peak
memory above what was allocated before (weights, prompt), against the bound of one chunk's prefill
(``hf_longctx.eval.estimate_memory_bytes(chunk)``: K/V + one layer's activations + a logits chunk) plus the
K/V of ``budget`` tokens. The same peak at both prompt lengths shows it does not grow with the prompt.

Rows run in order of importance (the acceptance rows first) and stop when ``--max-minutes`` is spent; the
rest are listed as skipped. A row that fails (out of memory, an error) is recorded and the next one runs.
Estimated (not yet measured) at about 4.5 minutes on an H100 with the defaults; the StaticCache compile is the
least certain part.

    PYTHONPATH=. python benchmarks/kv_cache.py --out benchmarks/results
    PYTHONPATH=. python benchmarks/kv_cache.py --out /tmp/kv --tiny     # CPU smoke run, tiny shapes

Appends one CSV row per measurement to ``kv_cache.csv`` in ``--out``, rewrites ``kv_cache.md`` after every
row and prints the markdown last.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import gc
import os
import statistics
import sys
import time
import traceback

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache, StoppingCriteria, StoppingCriteriaList

import hf_longctx as lc
from hf_longctx.attention.kv import KV_ATTENTION_NAME
from hf_longctx.cache import LongCtxLayer
from hf_longctx.config import KVEviction, parse_feature
from hf_longctx.eval import estimate_memory_bytes
from hf_longctx.eval.report import markdown_table
from hf_longctx.memory import measure_peak_memory

LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=131072 + 1024, rope_theta=500000.0,
)
TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096,
)
# Measured device copy bandwidth (read + write), TB/s, by a substring of the device name (BENCHMARKING.md).
COPY_TBPS = {"H200": 4.3, "H100": 3.0}
GIB = 2**30
FIELDS = [
    "time", "device", "torch", "transformers", "triton", "shape", "prompt", "batch", "provider", "ms_per_token",
    "tokens_per_s", "floor_ms", "x_floor", "kv_peak_gib", "kv_end_gib", "peak_gib", "stored_tokens",
    "same_tokens", "note",
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


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cache_bytes(cache) -> int:
    """Bytes of a cache's buffers: keys, values and (LongCtxCache) the per-slot validity and scores."""
    tensors = (getattr(layer, name, None) for layer in cache.layers for name in ("keys", "values", "valid", "scores"))
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def stored_tokens(cache, seen: int) -> list[int]:
    """Tokens each layer holds (what a decode step reads): LongCtxLayer's stored length, else all ``seen``."""
    return [layer.stored_length if isinstance(layer, LongCtxLayer) else seen for layer in cache.layers]


class StepTimer(StoppingCriteria):
    """Never stops generation; records the time after each generated token (synchronising first)."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores, **kwargs):
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def ms_per_token(self) -> float:
        """Median interval between consecutive tokens, ms (the first token comes from the prefill)."""
        return 1000 * statistics.median(b - a for a, b in zip(self.times, self.times[1:]))


class CachePeak:
    """A forward hook on the decoder that records the largest ``cache_bytes`` seen after any forward."""

    def __init__(self, decoder: torch.nn.Module):
        self.peak = 0
        self.handle = decoder.register_forward_hook(self)

    def __call__(self, module, args, output):
        cache = getattr(output, "past_key_values", None)
        if cache is not None:
            self.peak = max(self.peak, cache_bytes(cache))

    def remove(self) -> None:
        self.handle.remove()


@dataclasses.dataclass
class Provider:
    """One way to run generate: ``kind`` in dynamic / static / longctx / evict (with ``kv``)."""

    kind: str
    kv: KVEviction | None = None
    spec: str = ""
    graphs: bool = False  # decoded by lc.graph_generate (longctx and evict kinds)

    @property
    def label(self) -> str:
        return (self.spec if self.kind == "evict" else self.kind) + ("+graphs" if self.graphs else "")


def budget_spec(args, budget: int) -> str:
    """The eviction spec of a budget row: ``POLICY:BUDGET``, with ``every=`` when ``--every`` is set."""
    return f"{args.policy}:{budget}" + (f",every={args.every}" if args.every else "")


def evicting(spec: str, chunk: int, graphs: bool = False) -> Provider:
    """``POLICY:BUDGET[,field=value...]`` with ``prefill_chunk=chunk`` unless the spec sets one."""
    kv = parse_feature("kv", spec)
    if kv.prefill_chunk is None:
        kv = dataclasses.replace(kv, prefill_chunk=chunk)
    return Provider("evict", kv, spec, graphs)


class Bench:
    """The model, its sizes, and the generate runs of each provider."""

    def __init__(self, model, args, device: torch.device):
        self.model, self.args, self.device = model, args, device
        config = model.config
        self.weights = sum(p.numel() * p.element_size() for p in model.parameters())
        head_dim = config.hidden_size // config.num_attention_heads
        self.token_layer_bytes = 2 * config.num_key_value_heads * head_dim * model.dtype.itemsize
        self.kv_per_token = config.num_hidden_layers * self.token_layer_bytes

    def prompt(self, batch: int, length: int) -> torch.Tensor:
        """Random token ids (batch, length), the same for every provider of a (batch, length)."""
        generator = torch.Generator().manual_seed(1_000_003 * batch + length)
        return torch.randint(3, self.model.config.vocab_size, (batch, length), generator=generator).to(self.device)

    def kv_bytes(self, provider: Provider, batch: int, length: int) -> int:
        """K/V bytes a row must hold: every token without eviction, about budget + chunk tokens with it
        (twice that: PyramidKV's first layer keeps up to 1.5x the budget, and the buffers grow by doubling)."""
        if provider.kind != "evict":
            return batch * (length + self.args.new) * self.kv_per_token
        kv = provider.kv
        return 2 * batch * (kv.budget + min(length, kv.prefill_chunk)) * self.kv_per_token

    def generate(self, provider: Provider, ids: torch.Tensor, new: int, stopping=(), **kwargs):
        """Greedy generate of ``new`` tokens with the provider's cache; returns generate's output."""
        model = self.model
        attention = model.config._attn_implementation
        if provider.kind == "evict":
            lc.patch(model, kv=provider.kv)
        if provider.graphs:
            model.set_attn_implementation(KV_ATTENTION_NAME)  # the static path lives in it (patch sets it too)
            kwargs["custom_generate"] = lc.graph_generate
            kwargs["past_key_values"] = lc.LongCtxCache(model, kv=provider.kv, reserve=ids.shape[1] + new,
                                                        cuda_graphs=True)
        try:
            return model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                return_dict_in_generate=True, stopping_criteria=StoppingCriteriaList(stopping), **kwargs,
            )
        finally:
            lc.unpatch(model)
            model.set_attn_implementation(attention)

    def decode_row(self, provider: Provider, batch: int, length: int) -> dict:
        """One timed generate run of ``provider``; the row's measurements."""
        new, kwargs, note = self.args.new, {}, ""
        ids = self.prompt(batch, length)
        if provider.kind == "static":
            cache = StaticCache(config=self.model.config, max_cache_len=length + new)
            chunk = self.args.static_prefill_chunk
            self.generate(provider, ids[:, :16], 8, past_key_values=cache)  # compiles the decode step
            cache.reset()
            kwargs = {"past_key_values": cache, "prefill_chunk_size": chunk if chunk < length else None}
            note = f"prefill_chunk_size={chunk}; " if chunk < length else ""
        elif provider.kind == "longctx" and not provider.graphs:
            kwargs = {"past_key_values": lc.LongCtxCache(self.model, reserve=length + new)}
        timer = StepTimer(self.device)
        hook = None if provider.kind == "static" else CachePeak(self.model.model)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            out = self.generate(provider, ids, new, stopping=[timer], **kwargs)
        finally:
            if hook is not None:
                hook.remove()
        cache = out.past_key_values
        ms = timer.ms_per_token()
        stored = stored_tokens(cache, length + new - 1)
        read = self.weights + batch * sum(stored) * self.token_layer_bytes
        floor = None if self.args.bandwidth is None else 1000 * read / (self.args.bandwidth * 1e12)
        end_bytes = cache_bytes(cache)
        return dict(
            ms_per_token=round(ms, 3), tokens_per_s=round(1000 * batch / ms, 1),
            floor_ms=None if floor is None else round(floor, 3), x_floor=None if floor is None else round(ms / floor, 2),
            kv_peak_gib=_gib(max(end_bytes, 0 if hook is None else hook.peak)), kv_end_gib=_gib(end_bytes),
            peak_gib=_gib(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None,
            stored_tokens=round(sum(stored) / len(stored)), sequences=out.sequences.cpu(), note=note,
        )

    def prefill_row(self, length: int, chunk: int, budget: int) -> dict:
        """Chunked prefill with snapkv eviction (one generated token): peak memory above what was allocated."""
        provider = evicting(f"{self.args.policy}:{budget}", chunk)
        ids = self.prompt(1, length)
        hook = CachePeak(self.model.model)
        try:
            with measure_peak_memory(self.device) as peak:
                self.generate(provider, ids, 1)
        finally:
            hook.remove()
        bound = estimate_memory_bytes(self.model, chunk) + budget * self.kv_per_token
        measured = None if peak.peak_mib is None else peak.peak_mib * 2**20
        return dict(
            prompt=length, chunk=chunk, budget=budget, peak_gib=None if measured is None else _gib(measured),
            bound_gib=_gib(bound), x_bound=None if measured is None else round(measured / bound, 2),
            kv_peak_gib=_gib(hook.peak), kv_budget_chunk_gib=_gib((budget + chunk) * self.kv_per_token),
            full_prefill_gib=_gib(estimate_memory_bytes(self.model, length)), source=peak.source,
        )


class Recorder:
    """Rows of both tables; the CSV (decode rows, appended) and the markdown (rewritten after every row)."""

    def __init__(self, out_dir: str, info: dict, shape: str, args):
        self.out_dir, self.info, self.shape, self.args = out_dir, info, shape, args
        self.rows: list[dict] = []
        self.prefill_rows: list[dict] = []
        self.notes: list[str] = []
        os.makedirs(out_dir, exist_ok=True)
        self.csv_path = os.path.join(out_dir, "kv_cache.csv")
        if not os.path.exists(self.csv_path):
            with open(self.csv_path, "w", newline="") as handle:
                csv.DictWriter(handle, fieldnames=FIELDS).writeheader()

    def add(self, prompt: int, batch: int, provider: str, **measured) -> None:
        row = dict(self.info, time=datetime.datetime.now().isoformat(timespec="seconds"), shape=self.shape,
                   prompt=prompt, batch=batch, provider=provider, **measured)
        row.setdefault("note", "")
        self.rows.append(row)
        with open(self.csv_path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore").writerow(row)
        print("  " + ", ".join(f"{key}={row.get(key)}" for key in FIELDS[6:] if row.get(key) not in (None, "")),
              flush=True)
        self.write()

    def add_prefill(self, row: dict) -> None:
        self.prefill_rows.append(row)
        print("  prefill " + ", ".join(f"{key}={value}" for key, value in row.items()), flush=True)
        self.write()

    def find(self, prompt: int, batch: int, provider: str) -> dict | None:
        return next((r for r in self.rows if (r["prompt"], r["batch"], r["provider"]) == (prompt, batch, provider)
                     and r.get("ms_per_token") is not None), None)

    def decode_table(self) -> str:
        header = ["prompt", "batch", "provider", "ms/token", "tokens/s", "floor ms", "x floor", "KV GiB peak",
                  "KV GiB end", "peak GiB", "stored tokens/layer", "dynamic ms / this", "same tokens", "note"]
        rows = []
        for r in sorted(self.rows, key=lambda row: (row["batch"], row["prompt"])):  # stable: run order within
            base = self.find(r["prompt"], r["batch"], "dynamic")
            speedup = f"{base['ms_per_token'] / r['ms_per_token']:.2f}x" if base and r.get("ms_per_token") else ""
            rows.append([r["prompt"], r["batch"], r["provider"], *(_cell(r.get(k)) for k in (
                "ms_per_token", "tokens_per_s", "floor_ms", "x_floor", "kv_peak_gib", "kv_end_gib", "peak_gib",
                "stored_tokens")), speedup, _cell(r.get("same_tokens")), r.get("note", "")])
        return markdown_table(header, rows)

    def acceptance_table(self) -> str:
        args = self.args
        length, budget = args.prompts[-1], args.budgets[0]
        dynamic = self.find(length, 1, "dynamic")
        # the graph rows where measured (the eager loop's per-token overhead is not the cache's), else the eager ones
        longctx = self.find(length, 1, "longctx+graphs") or self.find(length, 1, "longctx")
        evict = self.find(length, 1, f"{budget_spec(args, budget)}+graphs") or self.find(length, 1,
                                                                                      budget_spec(args, budget))

        def ratio(numerator, denominator, key_n, key_d):
            if not numerator or not denominator or numerator.get(key_n) is None or not denominator.get(key_d):
                return None
            return numerator[key_n] / denominator[key_d]

        name = longctx["provider"] if longctx else "longctx"
        evict_name = evict["provider"] if evict else budget_spec(args, budget)
        checks = [
            (f"dynamic ms / {name} ms (prompt {length}, batch 1)", ratio(dynamic, longctx, "ms_per_token",
                                                                          "ms_per_token"), ">=", 3.0),
            (f"{name} ms / bandwidth floor ms", None if not longctx else longctx.get("x_floor"), "<=", 1.5),
            (f"dynamic KV GiB / {evict_name} peak KV GiB", ratio(dynamic, evict, "kv_end_gib", "kv_peak_gib"),
             ">=", 20.0),
            (f"dynamic KV GiB / {evict_name} KV GiB at the end (decoding)",
             ratio(dynamic, evict, "kv_end_gib", "kv_end_gib"), ">=", 20.0),
            (f"dynamic ms / {evict_name} ms", ratio(dynamic, evict, "ms_per_token", "ms_per_token"), ">=", 5.0),
        ]
        longest = max((r["prompt"] for r in self.prefill_rows), default=None)
        for r in self.prefill_rows:
            if r["prompt"] == longest and r["x_bound"] is not None:
                checks.append((f"chunked prefill, prompt {r['prompt']}, chunk {r['chunk']}, budget {r['budget']}: "
                               "peak above weights / bound", r["x_bound"], "<=", 1.0))
        rows = []
        for name, value, op, target in checks:
            verdict = "" if value is None else ("yes" if (value >= target if op == ">=" else value <= target) else "NO")
            rows.append([name, "not measured" if value is None else f"{value:.2f}x", f"{op} {target:g}x", verdict])
        return markdown_table(["acceptance check", "measured", "target", "met"], rows)

    def prefill_table(self) -> str:
        header = ["prompt", "chunk", "budget", "peak GiB above weights", "bound GiB (chunk prefill + budget K/V)",
                  "peak / bound", "KV GiB peak", "K/V of budget + chunk GiB", "full prefill estimate GiB"]
        keys = ("prompt", "chunk", "budget", "peak_gib", "bound_gib", "x_bound", "kv_peak_gib", "kv_budget_chunk_gib",
                "full_prefill_gib")
        return markdown_table(header, [[_cell(r.get(k)) for k in keys] for r in self.prefill_rows])

    def markdown(self) -> str:
        info, args = self.info, self.args
        floor = f"{args.bandwidth} TB/s" if args.bandwidth else "n/a (no bandwidth given)"
        lines = [
            f"# KV cache decode ({info['device']}; torch {info['torch']}, transformers {info['transformers']}, "
            f"triton {info['triton']})", "",
            f"{self.shape}, random weights, sdpa; greedy `model.generate`, {args.new} new tokens; ms/token = median "
            f"interval between generated tokens; floor = (weights + K/V read per step) / {floor}; eviction providers "
            f"prefill in chunks of {args.chunk} tokens. Command: `{' '.join(sys.argv)}`.", "",
            self.decode_table(), "", "## Acceptance (issue 5)", "", self.acceptance_table(),
        ]
        if self.prefill_rows:
            lines += ["", f"## Chunked prefill with {args.policy} eviction: peak memory (one generated token)", "",
                      self.prefill_table()]
        if self.notes:
            lines += ["", "Notes:", ""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        with open(os.path.join(self.out_dir, "kv_cache.md"), "w") as handle:
            handle.write(self.markdown())


def _gib(nbytes: float) -> float:
    """Bytes as GiB, 4 significant digits (tiny runs hold kilobytes)."""
    return float(f"{nbytes / GIB:.4g}")


def _cell(value) -> str:
    return "" if value is None else str(value)


def plan(args, bench: Bench, memory: float) -> list[tuple]:
    """Rows in order of importance: ("decode", batch, prompt, provider) or ("prefill", prompt, chunk, budget).

    The acceptance rows first (longest prompt, batch 1; the chunked-prefill table), then the other budgets,
    prompts and batches, then StaticCache (a compile per size), the ``--variants``, and last the eviction rows
    whose batch and prompt are too large for a full cache (batch 8 at 128K: a 1M-token prefill).
    """
    longest = args.prompts[-1]
    specs = [budget_spec(args, budget) for budget in args.budgets]
    core = [Provider("dynamic"), Provider("longctx"), evicting(specs[0], args.chunk)]
    if args.graphs:
        core += [Provider("longctx", graphs=True), evicting(specs[0], args.chunk, graphs=True)]
    rows = [("decode", 1, longest, provider) for provider in core]
    rows += [("prefill", length, chunk, budget) for length in sorted(set(args.prompts))[-2:][::-1]
             for chunk, budget in args.prefill_grid]
    rows += [("decode", 1, longest, evicting(spec, args.chunk)) for spec in specs[1:]]
    last = []
    for batch in args.batches:
        for length in args.prompts:
            providers = core + ([evicting(spec, args.chunk) for spec in specs[1:]] if batch == 1 else [])
            for provider in providers:
                if (batch, length) == (1, longest):
                    continue
                heavy = length == longest or bench.kv_bytes(provider, batch, length) > memory
                (last if heavy else rows).append(("decode", batch, length, provider))
    rows += [("decode", 1, length, Provider("static")) for length in args.static_prompts]
    rows += [("decode", 1, longest, evicting(spec, args.chunk)) for spec in args.variants]
    return rows + last


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: [int(x) for x in text.split(",") if x.strip()]  # noqa: E731
    parser.add_argument("--out", required=True, help="results directory (CSV appended, markdown rewritten)")
    parser.add_argument("--tiny", action="store_true", help="tiny model and prompts on the CPU (a smoke run)")
    parser.add_argument("--prompts", type=ints, default=None, help="prompt lengths (8192,32768,131072)")
    parser.add_argument("--batches", type=ints, default=None, help="batch sizes (1,8)")
    parser.add_argument("--new", type=int, default=None, help="new tokens per run (24)")
    parser.add_argument("--policy", default="snapkv", help="eviction policy of the budget rows (snapkv)")
    parser.add_argument("--every", type=int, default=None,
                        help="evict every N decode steps in the budget rows (GPU default 64: one eviction, with its "
                             "scoring and compaction in every layer, per 64 tokens; 0: every step)")
    parser.add_argument("--budgets", type=ints, default=None,
                        help="eviction budgets, the first is the acceptance's (4096,2048)")
    parser.add_argument("--chunk", type=int, default=None, help="prefill chunk of the eviction rows (2048)")
    parser.add_argument("--variants", nargs="*", default=None,
                        help="more eviction specs at the longest prompt, batch 1 (snapkv:4096 streaming:4096,every=64)")
    parser.add_argument("--static-prompts", type=ints, default=None,
                        help="prompts with a StaticCache row, batch 1 (131072; each compiles ~1 min)")
    parser.add_argument("--static-prefill-chunk", type=int, default=8192, help="StaticCache's prefill_chunk_size")
    parser.add_argument("--prefill-grid", default=None,
                        help="chunk:budget pairs of the prefill memory table (2048:4096,8192:4096)")
    parser.add_argument("--bandwidth", type=float, default=None, help="copy bandwidth for the floor, TB/s "
                        "(default: by device name, 3.0 on H100, 4.3 on H200)")
    parser.add_argument("--graphs", type=int, choices=(0, 1), default=None,
                        help="add the CUDA-graph rows (longctx+graphs, first budget +graphs); default 1 on the GPU, "
                             "0 with --tiny (on the CPU they run the same steps eagerly)")
    parser.add_argument("--max-minutes", type=float, default=4.5, help="stop starting rows after this long")
    args = parser.parse_args(argv)

    tiny = args.tiny or not torch.cuda.is_available()
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    pick = lambda value, small, large: value if value is not None else (small if tiny else large)  # noqa: E731
    args.prompts = sorted(pick(args.prompts, [128, 256], [8192, 32768, 131072]))
    args.batches = pick(args.batches, [1, 2], [1, 8])
    args.new = pick(args.new, 4, 24)
    args.budgets = pick(args.budgets, [64, 48], [4096, 2048])
    args.chunk = pick(args.chunk, 32, 2048)
    args.every = pick(args.every, 0, 64)
    args.variants = pick(args.variants, ["streaming:64"], [f"{args.policy}:4096", "streaming:4096,every=64"])
    args.static_prompts = pick(args.static_prompts, [256], [131072])
    args.graphs = bool(pick(args.graphs, 0, 1))
    grid = pick(args.prefill_grid, "32:64", "2048:4096,8192:4096")
    args.prefill_grid = [tuple(int(x) for x in pair.split(":")) for pair in grid.split(",") if pair.strip()]
    if args.bandwidth is None and not tiny:
        name = torch.cuda.get_device_name(device)
        args.bandwidth = next((tbps for key, tbps in COPY_TBPS.items() if key in name), None)
    if args.new < 3:
        raise ValueError(f"--new: at least 3 new tokens (two decode intervals), got {args.new}")
    for budget in args.budgets:
        KVEviction(policy=args.policy, budget=budget)  # ValueError naming the bad parameter, before any work

    config = LlamaConfig(**(TINY if tiny else LLAMA3_8B), bos_token_id=1, eos_token_id=None, pad_token_id=0)
    with torch.device(device):
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    bench = Bench(model, args, device)
    shape = (f"{'tiny Llama' if tiny else 'Llama-3-8B shape'}, {str(dtype).removeprefix('torch.')}, "
             f"{config.num_hidden_layers} layers, H={config.num_attention_heads}, H_kv={config.num_key_value_heads}, "
             f"weights {bench.weights / GIB:.2f} GiB, K/V {bench.kv_per_token / 1024:g} KiB per token")
    info = versions(device)
    recorder = Recorder(args.out, info, shape, args)
    print(f"# {info} | {shape}", flush=True)

    started = time.time()
    expected: dict[tuple[int, int], torch.Tensor] = {}  # dynamic's tokens per (batch, prompt)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else float("inf")
    for row in plan(args, bench, free):
        kind, *params = row
        if time.time() - started > 60 * args.max_minutes:
            if kind == "decode":
                recorder.add(params[1], params[0], params[2].label, note="skipped: --max-minutes spent")
            else:
                recorder.notes.append(f"prefill row {params} skipped: --max-minutes spent")
            continue
        row_started = time.time()
        try:
            if kind == "prefill":
                print(f"prefill prompt={params[0]} chunk={params[1]} budget={params[2]}", flush=True)
                recorder.add_prefill(bench.prefill_row(*params))
                continue
            batch, length, provider = params
            print(f"decode prompt={length} batch={batch} {provider.label}", flush=True)
            needed = bench.kv_bytes(provider, batch, length)
            if needed > free:
                recorder.add(length, batch, provider.label,
                             note=f"skipped: its K/V alone needs {needed / GIB:.0f} GiB, {free / GIB:.0f} GiB free")
                continue
            measured = bench.decode_row(provider, batch, length)
            sequences = measured.pop("sequences")
            if provider.kind == "dynamic":
                expected[(batch, length)] = sequences
            elif (batch, length) in expected:
                measured["same_tokens"] = "yes" if torch.equal(sequences, expected[(batch, length)]) else "no"
            measured["note"] += f"{time.time() - row_started:.0f} s"
            recorder.add(length, batch, provider.label, **measured)
        except Exception as error:  # one failed row must not stop the others
            traceback.print_exc()
            message = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
            if kind == "decode":
                recorder.add(params[1], params[0], params[2].label, note=f"failed: {message}")
            else:
                recorder.notes.append(f"prefill row {params} failed: {message}")
                recorder.write()
        finally:
            lc.unpatch(model)
            release(device)
    print(f"\ntotal {time.time() - started:.0f} s\n")
    print(recorder.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
