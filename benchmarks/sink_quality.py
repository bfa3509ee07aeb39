"""Sink/window attention quality on the reference target (issue 4): perplexity at 1x..16x and passkey at 1x..8x
of the trained length (1024 tokens), stock against each sink/window variant, through ``hf-longctx eval``.

Variants (window + sinks = 1024, so a sinks + window cache spans the trained positions exactly):

- ``stock``: the model as trained (dense attention, true positions);
- ``window``: ``sink:1024,0``, a sliding window without sinks;
- ``sink``: ``sink:1020,4``, sinks at their true distances (up to 16K: beyond training);
- ``lm_infinite``: ``sink:1020,4,distance_limit=1023``, sinks seen at most 1023 tokens away (Lambda-mask);
- ``streaming_llm``: ``sink:1020,4,positions=cache``, positions counted inside the sinks + window cache.

Every (variant, task) is one ``hf-longctx eval MODEL --task {ppl,passkey} --longctx attention=SPEC`` process
(files in ``OUT/<variant>/``, each JSON with its exact command); ``--jobs`` of them run side by side, the
20M model leaves the GPU mostly idle. Then it writes ``OUT/sink_quality.json``, ``.md`` (tables) and
``sink_quality_ppl.png``, ``sink_quality_passkey.png`` (one line per variant), and prints the markdown.
Expected on an H100 with the defaults: about 2 minutes (process start-up, Triton compiles, 16K windows).

    PYTHONPATH=. python benchmarks/sink_quality.py --out benchmarks/results/sink_quality
    PYTHONPATH=. python benchmarks/sink_quality.py --out /tmp/sink-cpu --device cpu --dtype float32 \\
        --ppl-multiples 1,2 --ppl-samples 1 --passkey-multiples 1 --passkey-samples 1   # CPU smoke run
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import collect_evals, parse_eval_args, quality_markdown, run_evals, write_quality  # noqa: E402

VARIANTS = {
    "stock": None,
    "window": "sink:1024,0",
    "sink": "sink:1020,4",
    "lm_infinite": "sink:1020,4,distance_limit=1023",
    "streaming_llm": "sink:1020,4,positions=cache",
}
TASKS = ("ppl", "passkey")


def main(argv: list[str] | None = None) -> int:
    args = parse_eval_args(argv, __doc__, "--variants", VARIANTS, dtype="bfloat16", jobs=5)
    out = Path(args.out)
    specs = {v: VARIANTS[v] for v in args.variants}
    started = time.time()
    jobs = [(variant, task) for task in TASKS for variant in args.variants]  # the 16K perplexity windows first
    if not run_evals(args, jobs, "attention", specs):
        return 1
    results = collect_evals(out, specs, commands=True)
    markdown = quality_markdown(results, "Sink/window attention", "variant", "attention", [
        "A sink/window variant keeps only the sinks and the last window of keys, so it cannot retrieve a passkey",
        "that lies beyond its window: its passkey column measures that, its perplexity the stability past training.",
    ])
    write_quality(out, "sink_quality", results, markdown, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
