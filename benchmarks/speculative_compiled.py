"""Self-speculation against plain decoding with the decoder layers compiled (issue 7: the batch-32 bar's third
approach). An experiment, not a library feature: it monkeypatches the cache update and our attention function out
of the compiled graphs.

    PYTHONPATH=. python benchmarks/speculative_compiled.py --out OUT [--batch 32] [--context 32768] [--lengths 3]

The reference target (``speculative.load_pair``) is measured twice with the same ``LongCtxCache``, CUDA graphs and
``speculative.decode_rate`` method on both sides (plain ``lc.graph_generate``, self-speculation in graph-captured
rounds through the ``streaming:1024`` view): first as loaded, then with ``torch.compile`` on every decoder layer and
the final norm, the cache update (``LongCtxLayer.update``) and the ``longctx_kv`` attention function left eager
(graph breaks), so Inductor fuses the norms, rotary, residuals and SwiGLU between them. The compiled kernels are
captured in the same CUDA graphs. Compiled bf16 arithmetic rounds differently, so the compiled model's tokens are
compared with the eager one's and reported, not required equal. Writes ``speculative_compiled.md`` into --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import speculative as bench  # noqa: E402

import hf_longctx as lc  # noqa: E402
from hf_longctx.attention import kv  # noqa: E402
from hf_longctx.cache.layers import LongCtxLayer  # noqa: E402


def measure(target, ids, args) -> tuple[list[tuple], dict]:
    """Rows (method, tokens/s, mean accepted, fixed s a call) and each method's first 24 greedy tokens."""
    methods = {"plain": {}}
    for drafts in args.lengths:
        spec = lc.Speculative(draft="self", draft_kv="streaming:1024", num_draft_tokens=drafts, max_draft_tokens=8,
                              cuda_graphs=True)
        methods[f"self G={drafts}"] = dict(custom_generate=lc.speculative_generate, speculative=spec)
    rows, tokens = [], {}
    for name, extra in methods.items():
        run = bench.generate_fn(target, ids, 0.0, True, **extra)
        counter = bench.RoundCounter(target) if extra else None
        rate, accepted, fixed = bench.decode_rate(run, args.batch, args.n1, args.n2, counter, args.repeats)
        if counter is not None:
            counter.remove()
        rows.append((name, rate, accepted, fixed))
        tokens[name] = run(24)
    return rows, tokens


def compile_layers(target) -> None:
    """``torch.compile`` each decoder layer and the final norm; the cache update and the attention stay eager."""
    LongCtxLayer.update = torch.compiler.disable(LongCtxLayer.update)
    lc_attention = torch.compiler.disable(kv.kv_attention_forward)
    from transformers import AttentionInterface

    AttentionInterface.register(kv.KV_ATTENTION_NAME, lc_attention)
    torch._dynamo.config.cache_size_limit = 64  # one graph per shape: prefill, one-token steps, verification blocks
    for layer in target.model.layers:
        layer.compile(dynamic=False)
    target.model.norm.compile(dynamic=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--tokens", default="128,512", help="n1,n2 new tokens (speculative.decode_rate)")
    parser.add_argument("--lengths", default="3", help="fixed draft lengths")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    args.n1, args.n2 = (int(x) for x in args.tokens.split(","))
    args.lengths = [int(x) for x in args.lengths.split(",")]
    tokenizer, target, _ = bench.load_pair(args.device)
    ids = bench.held_out_ids(tokenizer, args.context, args.batch, args.device)
    eager_rows, eager_tokens = measure(target, ids, args)
    began = time.perf_counter()
    compile_layers(target)
    compiled_rows, compiled_tokens = measure(target, ids, args)
    info = bench.versions()
    lines = [
        "# Self-speculation with the decoder layers compiled (issue 7)", "",
        f"{info['device']}; torch {info['torch']}, triton {info['triton']}, transformers {info['transformers']}; "
        f"bf16 reference target (yarn:32), context {args.context}, batch {args.batch}, view streaming:1024, "
        f"{args.n1}/{args.n2} new tokens, medians of {args.repeats} runs. Produced by `PYTHONPATH=. python "
        "benchmarks/speculative_compiled.py`. Speedups are over plain decoding of the same model (eager layers: "
        "eager plain; compiled layers: compiled plain).", "",
        "| layers | method | tokens/s | ms/token | speedup | mean accepted (slowest row) | fixed ms a call |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, rows in (("eager", eager_rows), ("compiled", compiled_rows)):
        plain = rows[0][1]
        for name, rate, accepted, fixed in rows:
            lines.append(f"| {label} | {name} | {rate:.1f} | {1000 * args.batch / rate:.3f} | {rate / plain:.2f} | "
                         f"{'' if accepted is None else f'{accepted:.2f}'} | {1000 * fixed:.0f} |")
    same = {name: torch.equal(eager_tokens[name], compiled_tokens[name]) for name in eager_tokens}
    lines += ["", f"Compiled part (compilation included): {time.perf_counter() - began:.0f} s. First 24 greedy tokens "
              f"equal to the eager layers' (bf16 fusion rounds differently): {same}."]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speculative_compiled.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
