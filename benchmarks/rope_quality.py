"""RoPE scaling quality on the reference target (issue 6): perplexity at 1x..16x and passkey at 1x..8x of
the trained length, for stock and each training-free method, through ``hf-longctx eval``.

Every (method, task) is one ``hf-longctx eval MODEL --task {ppl,passkey} --longctx rope=SPEC`` run (its
files land in ``OUT/<method>/``, with the exact command in each JSON); ``--jobs`` of them run side by side
(the 20M model leaves the GPU mostly idle). Then the script writes the combined results:

- ``OUT/rope_quality.json``: per method, its spec, lengths, perplexities and passkey accuracies;
- ``OUT/rope_quality.md``: the method x length tables and the verdict (which training-free methods reach
  passkey >= 90% at 4x the trained length);
- ``OUT/rope_quality_ppl.png``, ``OUT/rope_quality_passkey.png``: one line per method;

and prints the markdown last. On an H100, defaults (8 methods, 4 ppl windows, 5 depths x 5 prompts per
passkey length, 4 jobs) take about 3-5 minutes, most of it process start-up, model loading, Triton compiles
and the 16K-token windows.

    PYTHONPATH=. python benchmarks/rope_quality.py --out benchmarks/results/rope_quality
    python benchmarks/rope_quality.py --out out/rope-quality-cpu --device cpu --dtype float32 \\
        --methods stock,self_extend --ppl-multiples 1,2 --passkey-multiples 1,2 --ppl-samples 1 \\
        --passkey-samples 1   # CPU smoke run, a few minutes
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import collect_evals, parse_eval_args, quality_markdown, run_evals, write_quality  # noqa: E402

# name -> --longctx rope spec (None: the stock model). The static factors target 4x; dynamic_yarn caps at 16x.
# self_extend: far distances stay below 1024 up to 8x (8191 // 16 + 256 - 16 = 751); dual_chunk: never
# above chunk_size - 1 = 1023.
METHODS = {
    "stock": None,
    "linear": "linear:4",
    "ntk": "ntk:4",
    "dynamic": "dynamic:4",
    "yarn": "yarn:4",
    "dynamic_yarn": "dynamic_yarn:16",
    "self_extend": "self_extend:window=256,group=16",
    "dual_chunk": "dual_chunk:chunk_size=1024,local_size=128",
}
TRAINING_FREE = [name for name in METHODS if name != "stock"]
PASSKEY_BAR, BAR_MULTIPLE = 0.9, 4


def to_markdown(results: dict) -> str:
    """The tables of ``collect_evals`` and the verdict: which training-free methods reach passkey >= PASSKEY_BAR
    at BAR_MULTIPLE x the trained length."""
    first = next(iter(results.values()))
    bar_length = BAR_MULTIPLE * first["training_length"]
    passing = [
        m for m, r in results.items()
        if m in TRAINING_FREE and r["passkey"][r["passkey_lengths"].index(bar_length)] >= PASSKEY_BAR
    ] if bar_length in first["passkey_lengths"] else []
    if bar_length not in first["passkey_lengths"]:
        verdict = f"Passkey was not measured at {BAR_MULTIPLE}x ({bar_length} tokens)."
    elif passing:
        verdict = (f"Training-free methods with passkey >= {PASSKEY_BAR:.0%} at {BAR_MULTIPLE}x the trained length "
                   f"({bar_length} tokens): {', '.join(passing)}.")
    else:
        verdict = (f"No training-free method reaches passkey >= {PASSKEY_BAR:.0%} at {BAR_MULTIPLE}x "
                   f"({bar_length} tokens).")
    return quality_markdown(results, "RoPE scaling", "method", "rope", [verdict])


def main(argv=None) -> int:
    args = parse_eval_args(argv, __doc__, "--methods", METHODS, dtype="auto", jobs=4)
    out = Path(args.out)
    # Long jobs first (the remapped attention at 16K, then passkey runs), so the pool ends together.
    jobs = [(m, "ppl") for m in args.methods] + [(m, "passkey") for m in args.methods]
    jobs.sort(key=lambda job: (METHODS[job[0]] is None or not METHODS[job[0]].startswith(("self", "dual")), job[1]))
    specs = {m: METHODS[m] for m in args.methods}
    started = time.time()
    if not run_evals(args, jobs, "rope", specs):
        return 1
    results = collect_evals(out, specs)
    write_quality(out, "rope_quality", results, to_markdown(results), started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
