"""Speculative decoding benchmark (issue 7): tokens/s and mean accepted length.

    PYTHONPATH=. python benchmarks/speculative.py --out OUT [--quick] [--parts pair,lengths,draft,cost]

Parts (each runs on its own: a failure is logged and the next part runs):
- ``pair``: the reference target ``model_cards/longctx-target-20m`` (RoPE ``yarn:32`` for 32K: static
  frequencies, since the dynamic types, best in benchmarks/results/rope_quality.md, update them on the host at
  every step, which CUDA graphs cannot replay) on held-out text (``hf_longctx.eval.corpus``
  validation split), 8K and 32K, batch 1 and 32, temperature 0 and 0.8: self-speculation against plain
  decoding with the SAME ``LongCtxCache`` and attention (``longctx_kv``), so the cache's own speed is not
  credited to speculation. CUDA graphs on both sides (``--graphs``, the default): plain decoding is
  ``lc.graph_generate`` and self-speculation replays whole rounds (``Speculative(cuda_graphs=True)``:
  ``hf_longctx.speculative.rounds``); ``--no-graphs`` runs both eagerly.
- ``lengths``: self-speculation at 32K batch 1 (``--lengths-batch``), temperature 0: fixed draft lengths 1..8
  against ``"adaptive"`` (``--lengths``).
- ``draft``: draft-model speculation (``model_cards/longctx-draft-3m``, its cache bounded by ``streaming:1024``)
  against HF assisted generation (``assistant_model=``, stock caches) with the same pair, batch 1, 32K.
- ``cost``: the cost structure on a Llama-3-8B-shaped target with RANDOM weights (acceptance is meaningless
  there, so none is measured): one plain decode step, one self-draft step through the view, one verification
  pass of G + 1 queries, at 8K/32K/128K batch 1; the speedup these costs give at an assumed per-token acceptance
  a is E(a) * t_plain / (G * t_draft + t_verify), E(a) = (1 - a^(G+1)) / (1 - a) (reported as a model).

Decode rates come from runs of two lengths (the prefill cancels out), the median time of ``repeats`` runs of each
(3 with --quick, else 10): tokens/s = B * (n2 - n1) / (t2 - t1); the lengths part also reports the fixed cost a
call, the intercept t1 - B * n1 / rate (prefill, graph captures, an adaptive rule's exploration). Mean accepted
length = tokens emitted per row per verification round (the round's own token included), counted in the runs of
length n2; at batch > 1 the rounds go on until the slowest row has its n2 tokens, so it is the slowest row's rate
(rows advance by their own counts). Writes ``speculative.csv`` (one row per measurement, appended) and
``speculative.md`` into --out; the markdown table is printed last.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hf_longctx as lc  # noqa: E402
from hf_longctx.attention.kv import KV_ATTENTION_NAME  # noqa: E402
from hf_longctx.cache import LongCtxCache  # noqa: E402
from hf_longctx.speculative.forward import forward_unseen  # noqa: E402

CARDS = ROOT / "model_cards"
ROPE = "yarn:32"
FIELDS = ["time", "device", "torch", "triton", "transformers", "part", "context", "batch", "temperature", "method",
          "tokens_per_s", "ms_per_token", "mean_accepted", "speedup", "note", "graphs"]


def versions() -> dict:
    import triton
    import transformers

    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__}


class Recorder:
    """Appends CSV rows and rewrites the markdown after each measurement, from every row of the CSV (so runs of
    separate parts into one --out make one table)."""

    NUMERIC = ("tokens_per_s", "ms_per_token", "mean_accepted", "speedup")

    def __init__(self, out: Path, info: dict):
        self.out, self.info, self.rows = out, info, []
        out.mkdir(parents=True, exist_ok=True)
        self.csv = out / "speculative.csv"
        if not self.csv.exists():
            with open(self.csv, "w", newline="") as f:
                csv.writer(f).writerow(FIELDS)
        with open(self.csv, newline="") as f:
            for row in csv.DictReader(f):
                self.rows.append({k: float(v) if k in self.NUMERIC and v else v for k, v in row.items()})

    def add(self, **row) -> None:
        row = {**self.info, "time": _dt.datetime.now().isoformat(timespec="seconds"), **row}
        with open(self.csv, "a", newline="") as f:
            csv.writer(f).writerow([row.get(k, "") for k in FIELDS])
        self.rows.append(row)
        print(" | ".join(f"{k}={row.get(k, '')}" for k in FIELDS[5:]), flush=True)
        self.write()

    def write(self) -> None:
        def fmt(value, spec):
            return "" if value in (None, "") else format(value, spec)

        lines = [
            "# Speculative decoding (issue 7)", "",
            f"Device {self.info['device']}; torch {self.info['torch']}, triton {self.info['triton']}, "
            f"transformers {self.info['transformers']}; bf16. Produced by `PYTHONPATH=. python "
            "benchmarks/speculative.py --out OUT`. Rates from the median times of runs of two lengths (prefill "
            "cancelled). "
            f"Plain and speculative runs use the same LongCtxCache and `longctx_kv` attention; CUDA graphs "
            f"{self.info['graphs']}. The `cost` rows are an 8B-shaped model with RANDOM weights: times only, "
            "speedups there are a model at the stated acceptance, not measured acceptance.", "",
            "| part | context | batch | T | method | tokens/s | ms/token | mean accepted | speedup | note |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r['part']} | {r['context']} | {r['batch']} | {r.get('temperature', '')} | {r['method']} | "
                f"{fmt(r.get('tokens_per_s'), '.1f')} | {fmt(r.get('ms_per_token'), '.3f')} | "
                f"{fmt(r.get('mean_accepted'), '.2f')} | {fmt(r.get('speedup'), '.2f')} | {r.get('note', '')} |"
            )
        (self.out / "speculative.md").write_text("\n".join(lines) + "\n")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def held_out_ids(tokenizer, length: int, batch: int, device) -> torch.Tensor:
    """(batch, length) token ids of held-out text, each row starting at another offset."""
    from hf_longctx.eval.corpus import iter_documents

    need = length + batch * 997 + 16
    ids = []
    for document in iter_documents("validation"):
        ids += tokenizer(document.text + "\n")["input_ids"]
        if len(ids) >= need:
            break
    while len(ids) < need:  # a small corpus: repeat it
        ids = ids + ids
    return torch.tensor([ids[r * 997 : r * 997 + length] for r in range(batch)], device=device)


class RoundCounter:
    """Counts verification rounds: the target's forwards of more than one query outside the draft view (eager
    rounds), and ``StaticRounds.run`` calls (graph-captured rounds, whose replays run no Python forward); from
    the latter also each row's tokens per round (``row_mean``: emitted tokens over active row-rounds)."""

    def __init__(self, model):
        from hf_longctx.speculative.rounds import StaticRounds

        self.rounds = self.static_rounds = 0
        self.row_tokens = self.row_rounds = 0
        self.hook = model.register_forward_hook(self._count, with_kwargs=True)
        self._run = StaticRounds.run
        counter = self

        def run(state, drafts):
            status = counter._run(state, drafts)
            counter.static_rounds += 1
            counter.row_tokens += status.accepted + status.rows
            counter.row_rounds += status.rows
            return status

        StaticRounds.run = run

    def reset(self) -> None:
        self.rounds = self.static_rounds = self.row_tokens = self.row_rounds = 0

    def total(self) -> int:
        return self.static_rounds or self.rounds

    @property
    def row_mean(self) -> float | None:
        return self.row_tokens / self.row_rounds if self.row_rounds else None

    def remove(self) -> None:
        from hf_longctx.speculative.rounds import StaticRounds

        self.hook.remove()
        StaticRounds.run = self._run

    def _count(self, module, args, kwargs, output):
        cache = kwargs.get("past_key_values")
        layers = getattr(cache, "layers", [])
        if any(getattr(layer, "static", False) for layer in layers):
            return  # a StaticRounds forward (warm-up or capture): counted by run
        drafting = any(getattr(layer, "view", None) is not None for layer in layers)
        if not drafting and kwargs["input_ids"].shape[1] > 1 and cache.get_seq_length() > kwargs["input_ids"].shape[1]:
            self.rounds += 1


def decode_rate(run, batch: int, n1: int, n2: int, counter: RoundCounter | None = None,
                repeats: int = 1) -> tuple[float, float | None, float]:
    """(tokens/s, mean accepted, fixed seconds a call) from runs of n1 and n2 new tokens, ``repeats`` of each after
    one warm-up run, their median times: ``run(n)`` generates n tokens. The fixed seconds (prefill, graph captures,
    an adaptive rule's exploration) are the line's intercept: t(n1) - batch n1 / rate."""

    def seconds(n):
        sync()
        start = time.perf_counter()
        run(n)
        sync()
        return time.perf_counter() - start

    run(n1)  # warm-up (compiles, allocations)
    t1 = statistics.median(seconds(n1) for _ in range(repeats))
    if counter is not None:
        counter.reset()
    t2 = statistics.median(seconds(n2) for _ in range(repeats))
    accepted = None
    if counter is not None and counter.total():
        accepted = repeats * (n2 - 1) / counter.total()  # the first token comes from the prefill
    rate = batch * (n2 - n1) / (t2 - t1) if t2 > t1 else float("nan")  # nan: noise exceeded the difference
    return rate, accepted, t1 - batch * n1 / rate


def load_pair(device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(CARDS / "longctx-target-20m")
    target = AutoModelForCausalLM.from_pretrained(CARDS / "longctx-target-20m", dtype=torch.bfloat16).to(device).eval()
    draft = AutoModelForCausalLM.from_pretrained(CARDS / "longctx-draft-3m", dtype=torch.bfloat16).to(device).eval()
    for model in (target, draft):
        model.generation_config.eos_token_id = None  # fixed lengths: no early stop
        model.generation_config.pad_token_id = 0
    lc.patch(target, rope=ROPE)
    target.set_attn_implementation(KV_ATTENTION_NAME)
    return tokenizer, target, draft


def generate_fn(model, ids, temperature, graphs=False, **extra):
    """``run(n)`` generating n tokens over a fresh ``LongCtxCache``; with ``graphs`` and no other loop in ``extra``,
    plain decoding is ``lc.graph_generate``."""
    sampling = dict(do_sample=True, temperature=temperature, top_k=0) if temperature else dict(do_sample=False)
    if graphs and "custom_generate" not in extra:
        extra = {**extra, "custom_generate": lc.graph_generate}

    def run(n):
        torch.manual_seed(0)
        cache = LongCtxCache(model, reserve=ids.shape[1] + n + 64, cuda_graphs=graphs)
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              past_key_values=cache, **sampling, **extra)
    return run


def row_note(counter: RoundCounter) -> str:
    """The rounds' path, and with graph-captured rounds each row's mean tokens per round."""
    if not counter.static_rounds:
        return "eager rounds"
    return f"graph-captured rounds; per-row tokens/round {counter.row_mean:.2f}"


def part_pair(rec, args, pair, device):
    tokenizer, target, _ = pair
    for context in args.contexts:
        for batch in args.batches:
            ids = held_out_ids(tokenizer, context, batch, device)
            for temperature in (0.0, 0.8):
                spec = lc.Speculative(draft="self", draft_kv=args.view, num_draft_tokens=args.gamma,
                                      max_draft_tokens=8, cuda_graphs=args.graphs)
                try:
                    n1, n2 = args.pair_tokens
                    plain, _, _ = decode_rate(generate_fn(target, ids, temperature, args.graphs), batch, n1, n2,
                                              repeats=args.repeats)
                    rec.add(part="pair", context=context, batch=batch, temperature=temperature, method="plain",
                            tokens_per_s=plain, ms_per_token=1000 * batch / plain)
                    counter = RoundCounter(target)
                    ours, accepted, _ = decode_rate(
                        generate_fn(target, ids, temperature, args.graphs, custom_generate=lc.speculative_generate,
                                    speculative=spec), batch, n1, n2, counter, args.repeats)
                    counter.remove()
                    rec.add(part="pair", context=context, batch=batch, temperature=temperature,
                            method=f"self, view {args.view}, G={args.gamma}", tokens_per_s=ours,
                            ms_per_token=1000 * batch / ours, mean_accepted=accepted, speedup=ours / plain,
                            note=row_note(counter))
                except Exception as error:  # noqa: BLE001 - log and go on
                    traceback.print_exc()
                    rec.add(part="pair", context=context, batch=batch, temperature=temperature, method="error",
                            note=f"{type(error).__name__}: {str(error)[:120]}")
                finally:
                    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def part_lengths(rec, args, pair, device):
    tokenizer, target, _ = pair
    context, batch = args.contexts[-1], args.lengths_batch
    ids = held_out_ids(tokenizer, context, batch, device)
    n1, n2 = args.lengths_tokens
    plain, _, fixed = decode_rate(generate_fn(target, ids, 0.0, args.graphs), batch, n1, n2, repeats=args.repeats)
    rec.add(part="lengths", context=context, batch=batch, temperature=0.0, method="plain", tokens_per_s=plain,
            ms_per_token=1000 * batch / plain, note=f"fixed {1000 * fixed:.0f} ms a call")
    for gamma in args.lengths:
        try:
            spec = lc.Speculative(draft="self", draft_kv=args.view, num_draft_tokens=gamma,
                                  max_draft_tokens=8, threshold=args.threshold, cuda_graphs=args.graphs)
            counter = RoundCounter(target)
            ours, accepted, fixed = decode_rate(generate_fn(target, ids, 0.0, args.graphs,
                                                            custom_generate=lc.speculative_generate,
                                                            speculative=spec), batch, n1, n2, counter, args.repeats)
            counter.remove()
            rec.add(part="lengths", context=context, batch=batch, temperature=0.0, method=f"self G={gamma}",
                    tokens_per_s=ours, ms_per_token=1000 * batch / ours, mean_accepted=accepted, speedup=ours / plain,
                    note=f"{row_note(counter)}; fixed {1000 * fixed:.0f} ms a call")
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            rec.add(part="lengths", context=context, batch=batch, method=f"self G={gamma}: error",
                    note=f"{type(error).__name__}: {str(error)[:120]}")


def part_draft(rec, args, pair, device):
    tokenizer, target, draft = pair
    context = args.contexts[-1]
    ids = held_out_ids(tokenizer, context, 1, device)
    bounded = lc.patch(draft, kv="streaming:1024")
    spec = lc.Speculative(draft=bounded, draft_kv="streaming:1024", num_draft_tokens=args.gamma)
    counter = RoundCounter(target)
    ours, accepted, _ = decode_rate(generate_fn(target, ids, 0.0, custom_generate=lc.speculative_generate,
                                                speculative=spec), 1, args.n1, args.n2, counter, args.repeats)
    counter.hook.remove()
    rec.add(part="draft", context=context, batch=1, temperature=0.0, method=f"ours: draft-3m, G={args.gamma}",
            tokens_per_s=ours, ms_per_token=1000 / ours, mean_accepted=accepted, note="no CUDA graphs (eager)")
    lc.unpatch(bounded)
    target.set_attn_implementation("sdpa")
    try:
        def assisted(n):
            return target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                   do_sample=False, assistant_model=draft)
        theirs, _, _ = decode_rate(assisted, 1, args.n1, args.n2, repeats=args.repeats)
        rec.add(part="draft", context=context, batch=1, temperature=0.0, method="HF assisted (sdpa, DynamicCache)",
                tokens_per_s=theirs, ms_per_token=1000 / theirs, speedup=ours / theirs,
                note="speedup = ours / HF assisted")
    finally:
        target.set_attn_implementation(KV_ATTENTION_NAME)


def part_cost(rec, args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8)
    if args.cost_tiny:  # a CPU smoke test of the code path
        shape = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
    config = LlamaConfig(**shape, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16, attn_implementation=KV_ATTENTION_NAME)
    model.eval()
    view = lc.Speculative(draft="self", draft_kv="streaming:1024").self_view
    from hf_longctx.config import SinkAttention

    view = SinkAttention(sink_tokens=view.sink_tokens, window=view.budget - view.sink_tokens)
    gamma = args.gamma
    for context in args.cost_contexts:
        try:
            cache = LongCtxCache(model, reserve=context + 64)
            ids = torch.randint(0, config.vocab_size, (1, context + gamma + 2), device=device)
            with torch.no_grad():
                for stop in range(args.chunk, context + args.chunk, args.chunk):  # chunked prefill
                    forward_unseen(model, cache, ids[:, :min(stop, context)], None, keep=1)
                cache.activate_past_recording()

                def step(queries, drafting):
                    cache.set_view(view if drafting else None)
                    sync()
                    start = time.perf_counter()
                    forward_unseen(model, cache, ids[:, : context + queries], None, keep=queries)
                    sync()
                    elapsed = time.perf_counter() - start
                    cache.set_view(None)
                    cache.crop(-queries)
                    return elapsed

                def median(queries, drafting):
                    times = sorted(step(queries, drafting) for _ in range(args.repeats + 2))[1:-1]
                    return times[len(times) // 2]

                t_plain, t_draft, t_verify = median(1, False), median(1, True), median(gamma + 1, False)
            for name, seconds in (("plain step", t_plain), ("self-draft step (view 1024)", t_draft),
                                  (f"verify G+1={gamma + 1}", t_verify)):
                rec.add(part="cost (random 8B)", context=context, batch=1, method=name, ms_per_token=1000 * seconds)
            for alpha in (0.6, 0.8, 0.9):
                expected = (1 - alpha ** (gamma + 1)) / (1 - alpha)
                rec.add(part="cost (random 8B)", context=context, batch=1, method=f"model at acceptance {alpha}",
                        mean_accepted=expected, speedup=expected * t_plain / (gamma * t_draft + t_verify),
                        note=f"G={gamma}, assumed acceptance")
            del cache
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            rec.add(part="cost (random 8B)", context=context, batch=1, method="error",
                    note=f"{type(error).__name__}: {str(error)[:120]}")
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="results directory (CSV appended, markdown rewritten)")
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats (the GPU script's budget)")
    parser.add_argument("--parts", default="pair,lengths,draft,cost")
    parser.add_argument("--contexts", default="8192,32768", help="contexts of the reference pair")
    parser.add_argument("--cost-contexts", default="8192,32768,131072")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--gamma", default="4", help="draft length of the comparisons (pair: also 'adaptive')")
    parser.add_argument("--view", default="streaming:1024", help="self-speculation's draft view (pair, lengths)")
    parser.add_argument("--lengths", default="1,2,3,4,5,6,7,8,adaptive", help="draft lengths of the lengths part")
    parser.add_argument("--lengths-batch", type=int, default=1, help="batch of the lengths part")
    parser.add_argument("--pair-tokens", default=None, help="n1,n2 new tokens of the pair part (default: 64,320 with "
                        "--quick, else 128,640: at batch 32 a 32K prefill takes ~0.9 s; G = 4 measured 0.39x plain "
                        "over 16,48 tokens, 0.94x over 64,320)")
    parser.add_argument("--threshold", type=float, default=0.4, help="adaptive confidence threshold")
    parser.add_argument("--cost-tiny", action="store_true", help="cost part on a tiny model (CPU smoke test)")
    parser.add_argument("--chunk", type=int, default=4096, help="prefill chunk of the cost part")
    parser.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="CUDA graphs on both sides of pair/lengths (plain: graph_generate; speculation: "
                             "whole rounds)")
    parser.add_argument("--lengths-tokens", default="128,640",
                        help="n1,n2 new tokens of the lengths part (the rate is the steady one: an adaptive rule's "
                             "exploration, like the prefill and the captures, is in the fixed cost a call, reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    args.contexts = [int(x) for x in args.contexts.split(",")]
    args.cost_contexts = [int(x) for x in args.cost_contexts.split(",")]
    args.batches = [int(x) for x in args.batches.split(",")]
    args.lengths_tokens = [int(x) for x in args.lengths_tokens.split(",")]
    args.lengths = [x if x == "adaptive" else int(x) for x in args.lengths.split(",")]
    args.n1, args.n2 = (16, 48) if args.quick else (32, 160)
    args.pair_tokens = [int(x) for x in (args.pair_tokens or ("64,320" if args.quick else "128,640")).split(",")]
    args.gamma = args.gamma if args.gamma == "adaptive" else int(args.gamma)
    if args.gamma == "adaptive" and {"draft", "cost"} & set(args.parts.split(",")):
        parser.error("--gamma adaptive: the pair part only (draft and cost take a fixed length)")
    args.repeats = 3 if args.quick else 10
    rec = Recorder(Path(args.out), {**versions(), "graphs": "on both sides" if args.graphs else "off on both sides"})
    parts = args.parts.split(",")
    pair = None
    failed = 0
    for part in parts:
        began = time.perf_counter()
        print(f"=== {part}", flush=True)
        try:
            if part in ("pair", "lengths", "draft") and pair is None:
                pair = load_pair(args.device)
            if part == "pair":
                part_pair(rec, args, pair, args.device)
            elif part == "lengths":
                part_lengths(rec, args, pair, args.device)
            elif part == "draft":
                part_draft(rec, args, pair, args.device)
            elif part == "cost":
                pair = None
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
                part_cost(rec, args, args.device)
            else:
                raise ValueError(f"--parts: unknown part {part!r}; accepted: pair, lengths, draft, cost")
        except Exception as error:  # noqa: BLE001 - one part failing does not stop the next
            failed += 1
            traceback.print_exc()
            rec.add(part=part, context="", batch="", method="error", note=f"{type(error).__name__}: {str(error)[:120]}")
        print(f"=== {part}: {time.perf_counter() - began:.1f} s", flush=True)
    print((Path(args.out) / "speculative.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
