"""Where a graph-captured self-speculation round's time goes (issue 7): the reference target of
benchmarks/speculative.py at one context and batch.

    PYTHONPATH=. python benchmarks/speculative_profile.py --out DIR [--context 32768] [--batch 32]

Measures, each a mean over ``--replays`` graph replays with a device synchronisation around the batch of them:
- one plain decoding step (``GraphDecoder``, the step ``lc.graph_generate`` replays), over its own cache;
- one round of ``StaticRounds`` for G = 0 (its plain step, with the token emitted on the device), 1, 2, 4 and 8
  draft tokens;
then fits t(G) = t(0) + G * s (s: one draft step through the view) and states the speedup the costs allow at
each per-row tokens-per-round figure, and the KV bytes a plain step reads against the GPU's bandwidth. Last, a
torch.profiler table of a few replays of the G = 4 round (kernels by device time). Writes
DIR/speculative_profile.md and DIR/speculative_profile.txt. A diagnostic of costs, not a benchmark of rates.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speculative as bench  # noqa: E402

import hf_longctx as lc  # noqa: E402
from hf_longctx.cache import GraphDecoder, LongCtxCache  # noqa: E402
from hf_longctx.speculative.drafter import draft_view  # noqa: E402
from hf_longctx.speculative.forward import forward_unseen  # noqa: E402
from hf_longctx.speculative.rounds import StaticRounds  # noqa: E402
from transformers.generation import LogitsProcessorList  # noqa: E402

LENGTHS = (0, 1, 2, 4, 8)


def timed(fn, replays: int) -> float:
    """Mean milliseconds of ``fn()`` over ``replays`` calls, synchronised once around them."""
    bench.sync()
    start = time.perf_counter()
    for _ in range(replays):
        fn()
    bench.sync()
    return 1000 * (time.perf_counter() - start) / replays


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    tokenizer, target, _ = bench.load_pair(args.device)
    ids = bench.held_out_ids(tokenizer, args.context, args.batch, args.device)
    room = 8 * args.replays * (len(LENGTHS) + 2)

    # plain one-token steps over their own cache
    cache = LongCtxCache(target, reserve=args.context + room, cuda_graphs=True)
    with torch.no_grad():
        logits = forward_unseen(target, cache, ids, None, keep=1)[:, 0]
    decoder = GraphDecoder(target, cache)
    decoder.start(room)
    token, position = logits.argmax(-1), torch.full((args.batch,), args.context, device=args.device)
    with torch.no_grad():
        for _ in range(3):  # warm-up, capture
            decoder.step(token, position)
        plain = timed(lambda: decoder.step(token, position), args.replays)
    decoder.stop()
    del cache, decoder
    torch.cuda.empty_cache() if torch.cuda.is_available() else None

    # rounds of G drafts
    cache = LongCtxCache(target, cuda_graphs=True)
    spec = lc.Speculative(draft="self", draft_kv="streaming:1024", cuda_graphs=True)
    state = StaticRounds(target, cache, draft_view(spec, cache), LogitsProcessorList(), False, ids, None,
                         room, None, 0, max(LENGTHS))
    with torch.no_grad():
        logits = forward_unseen(target, cache, ids, None, keep=1)[:, 0]
    state.start(logits, reserve=room * 4)
    rounds = {}
    for drafts in LENGTHS:
        for _ in range(3):  # warm-up, capture, one replay
            state.run(drafts)
        rounds[drafts] = timed(lambda d=drafts: state.run(d), args.replays)
    slope = sum((rounds[g] - rounds[0]) / g for g in LENGTHS if g) / (len(LENGTHS) - 1)
    config = target.config
    kv_bytes = (2 * config.num_hidden_layers * args.batch * args.context * config.num_key_value_heads
                * config.head_dim * 2)
    lines = [
        f"# Static rounds: costs (issue 7)\n",
        f"{bench.versions()['device']}; torch {torch.__version__}; reference target (bf16, {bench.ROPE}), "
        f"context {args.context}, batch {args.batch}, view streaming:1024; mean of {args.replays} replays, each "
        f"with its host read (as in generation). `PYTHONPATH=. python benchmarks/speculative_profile.py`.\n",
        "| step | ms |", "|---|---|",
        f"| plain step (GraphDecoder replay, graph_generate's step) | {plain:.3f} |",
        *[f"| round, G = {g} ({f'{g} draft steps + a block of {g + 1}' if g else 'a plain step'}) | {rounds[g]:.3f} |"
          for g in LENGTHS],
        f"| fitted draft step s = (t(G) - t(0)) / G | {slope:.3f} |", "",
        f"KV read by a plain step: {kv_bytes / 1e9:.2f} GB ({kv_bytes / 1e9 / (plain / 1000) / 1e3:.2f} TB/s "
        f"at the measured step time).", "",
        "Speedup over the plain step the costs allow, E tokens a row per round: E * plain / t(G):", "",
        "| G | " + " | ".join(f"E={e}" for e in (1.5, 2, 2.5, 3, 4, 5)) + " |",
        "|---|" + "---|" * 6,
        *[f"| {g} | " + " | ".join(f"{e * plain / rounds[g]:.2f}" if e <= g + 1 else "-"
                                   for e in (1.5, 2, 2.5, 3, 4, 5)) + " |" for g in LENGTHS if g],
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "speculative_profile.md"), "w") as f:
        f.write(table)
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(5):
            state.run(4)
        bench.sync()
    report = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=30)
    with open(os.path.join(args.out, "speculative_profile.txt"), "w") as f:
        f.write(table + "\n5 replays of the G = 4 round:\n" + report)
    print(report)
    state.stop()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
