"""Where a self-speculation round's time goes (issue 7): the reference pair of benchmarks/speculative.py, one
context and batch, CUDA graphs on both sides.

    PYTHONPATH=. python benchmarks/speculative_profile.py --out DIR [--context 32768] [--batch 32] [--tokens 48]

Prints (and writes to DIR/speculative_profile.txt): the wall time of plain and speculative generation (prefill
included in both), then the wall time of each phase of the speculative loop with a device synchronisation around
every phase (so the phases do not overlap and their sum exceeds the unsynchronised run), the graph decoder's
replays / eager steps / captures, and two torch.profiler tables of one run (by host time and by device time).
A diagnostic, not a benchmark: the synchronised phases change what they measure.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speculative as bench  # noqa: E402

import hf_longctx as lc  # noqa: E402
from hf_longctx.cache import graphs  # noqa: E402
from hf_longctx.speculative import drafter, generate, sequences  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_phases(totals: dict, counts: collections.Counter) -> list[tuple[object, str, object]]:
    """Wrap the loop's phases with synchronised timers; returns (owner, name, original) to restore them."""
    phases = [(generate, "forward_unseen", "target forward (prefill + verifications)"),
              (drafter.SelfDraft, "propose", "drafting (G steps a round)"),
              (drafter.SelfDraft, "step", "  one draft step"),
              (generate, "greedy_accept", "greedy_accept"),
              (sequences.Sequences, "append", "Sequences.append"),
              (sequences.Sequences, "process", "Sequences.process"),
              (lc.LongCtxCache, "crop", "LongCtxCache.crop"),
              (lc.LongCtxCache, "mark_holes", "LongCtxCache.mark_holes")]
    saved = []
    for owner, attr, label in phases:
        original = getattr(owner, attr)

        def wrapper(*args, _fn=original, _label=label, **kwargs):
            sync()
            start = time.perf_counter()
            result = _fn(*args, **kwargs)
            sync()
            totals[_label] += time.perf_counter() - start
            counts[_label] += 1
            return result
        setattr(owner, attr, wrapper)
        saved.append((owner, attr, original))
    return saved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per row")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    report = io.StringIO()

    def say(line: str = "") -> None:
        print(line, flush=True)
        report.write(line + "\n")

    tokenizer, target, _ = bench.load_pair(args.device)
    ids = bench.held_out_ids(tokenizer, args.context, args.batch, args.device)
    spec = lc.Speculative(draft="self", draft_kv="streaming:1024", num_draft_tokens=4, cuda_graphs=True)
    graphed = args.device == "cuda"
    speculative = bench.generate_fn(target, ids, 0.0, graphed, custom_generate=lc.speculative_generate,
                                    speculative=spec)
    plain = bench.generate_fn(target, ids, 0.0, graphed)
    say(f"device {bench.versions()['device']}; context {args.context}, batch {args.batch}, {args.tokens} new tokens")
    speculative(16), plain(16)  # warm-up: compiles, captures
    for name, run in (("plain", plain), ("speculative", speculative)):
        sync()
        start = time.perf_counter()
        run(args.tokens)
        sync()
        say(f"{name}: {time.perf_counter() - start:.3f} s (prefill included)")

    totals, counts = collections.defaultdict(float), collections.Counter()
    saved = timed_phases(totals, counts)
    stop = graphs.GraphDecoder.stop
    graphs.GraphDecoder.stop = lambda self: (say(f"graph decoder: replays {self.replays}, eager steps "
                                                 f"{self.eager_steps}, captures {self.captures}"), stop(self))[1]
    try:
        sync()
        start = time.perf_counter()
        speculative(args.tokens)
        sync()
        say(f"speculative with synchronised phases: {time.perf_counter() - start:.3f} s")
        for label, seconds in totals.items():
            say(f"  {label:42s} {seconds * 1000:9.1f} ms  {counts[label]:5d} calls  "
                f"{seconds * 1000 / counts[label]:8.3f} ms/call")
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)
        graphs.GraphDecoder.stop = stop

    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with contextlib.redirect_stderr(io.StringIO()), torch.profiler.profile(activities=activities) as profile:
        speculative(args.tokens)
    averages = profile.key_averages()
    say(averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    if args.device == "cuda":
        say(averages.table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    with open(os.path.join(args.out, "speculative_profile.txt"), "w") as f:
        f.write(report.getvalue())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
