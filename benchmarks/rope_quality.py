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

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hf_longctx.eval import report

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


def _list(cast):
    return lambda text: [cast(item) for item in text.split(",") if item.strip()]


def eval_command(args, method: str, task: str) -> list[str]:
    """The ``hf-longctx eval`` command line of one (method, task)."""
    multiples = args.ppl_multiples if task == "ppl" else args.passkey_multiples
    samples = args.ppl_samples if task == "ppl" else args.passkey_samples
    words = [args.python, "-m", "hf_longctx.cli", "eval", args.model, "--output", str(Path(args.out) / method),
             "--task", task, "--multiples", ",".join(f"{m:g}" for m in multiples), "--samples", str(samples),
             "--dtype", args.dtype]
    if args.device:
        words += ["--device", args.device]
    if METHODS[method] is not None:
        words += ["--longctx", f"rope={METHODS[method]}"]
    return words


def run_one(args, method: str, task: str) -> tuple[str, str, float, int]:
    folder = Path(args.out) / method
    folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(folder / f"{task}.log", "w") as log:
        code = subprocess.call(eval_command(args, method, task), stdout=log, stderr=subprocess.STDOUT)
    return method, task, time.time() - started, code


def collect(args, methods: list[str]) -> dict:
    results = {}
    for method in methods:
        folder = Path(args.out) / method
        ppl = json.loads((folder / "ppl.json").read_text())
        passkey = json.loads((folder / "passkey.json").read_text())
        results[method] = {
            "spec": METHODS[method],
            "ppl_lengths": ppl["lengths"],
            "perplexity": ppl["perplexity"],
            "passkey_lengths": passkey["lengths"],
            "passkey": [sum(row) / len(row) for row in passkey["accuracy"]],
            "training_length": ppl["training_length"],
            "metadata": ppl["metadata"],
        }
    return results


def to_markdown(results: dict) -> str:
    first = next(iter(results.values()))
    trained = first["training_length"]

    def header(lengths):
        return ["method", "--longctx rope="] + [report.length_multiple(n, trained) for n in lengths]

    ppl_rows = [[m, r["spec"] or "-", *(f"{p:.2f}" for p in r["perplexity"])] for m, r in results.items()]
    key_rows = [[m, r["spec"] or "-", *(f"{a:.2f}" for a in r["passkey"])] for m, r in results.items()]
    bar_length = BAR_MULTIPLE * trained
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
    meta = first["metadata"]
    return "\n".join([
        f"# RoPE scaling on longctx-target-20m (trained at {trained} tokens)",
        "",
        f"Device {meta['device']}, dtype {meta['dtype']}, versions {meta['versions']}.",
        "",
        "## Perplexity (held-out text) vs context length",
        "",
        report.markdown_table(header(first["ppl_lengths"]), ppl_rows),
        "",
        "## Passkey accuracy (mean over depths) vs context length",
        "",
        report.markdown_table(header(first["passkey_lengths"]), key_rows),
        "",
        verdict,
    ])


def plot(results: dict, out: Path) -> None:
    first = next(iter(results.values()))
    report.line_plot(out / "rope_quality_ppl.png", first["ppl_lengths"],
                     {m: r["perplexity"] for m, r in results.items()}, xlabel="context length (tokens)",
                     ylabel="perplexity", title="Perplexity vs length, longctx-target-20m",
                     marker_x=first["training_length"], logy=True)
    report.line_plot(out / "rope_quality_passkey.png", first["passkey_lengths"],
                     {m: r["passkey"] for m, r in results.items()}, xlabel="context length (tokens)",
                     ylabel="passkey accuracy", title="Passkey vs length, longctx-target-20m",
                     marker_x=first["training_length"], ylim=(-0.05, 1.05))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="results directory")
    parser.add_argument("--model", default="model_cards/longctx-target-20m")
    parser.add_argument("--methods", type=_list(str), default=list(METHODS), help=f"any of {', '.join(METHODS)}")
    parser.add_argument("--ppl-multiples", type=_list(float), default=[1, 2, 4, 8, 16])
    parser.add_argument("--passkey-multiples", type=_list(float), default=[1, 2, 4, 8])
    parser.add_argument("--ppl-samples", type=int, default=4)
    parser.add_argument("--passkey-samples", type=int, default=5)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--jobs", type=int, default=4, help="eval processes run side by side")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs hf-longctx eval")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(METHODS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    # Long jobs first (the remapped attention at 16K, then passkey runs), so the pool ends together.
    jobs = [(m, "ppl") for m in args.methods] + [(m, "passkey") for m in args.methods]
    jobs.sort(key=lambda job: (METHODS[job[0]] is None or not METHODS[job[0]].startswith(("self", "dual")), job[1]))
    started = time.time()
    failed = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for method, task, seconds, code in pool.map(lambda job: run_one(args, *job), jobs):
            print(f"{method:>13} {task:<8} {seconds:6.1f}s {'ok' if code == 0 else f'FAILED (exit {code})'}",
                  flush=True)
            if code:
                failed.append(f"{out / method / task}.log")
    if failed:
        print("failed runs, see: " + ", ".join(failed))
        return 1
    results = collect(args, args.methods)
    (out / "rope_quality.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = to_markdown(results)
    (out / "rope_quality.md").write_text(markdown + "\n")
    plot(results, out)
    print(f"\n{markdown}\n\nwrote {out}/rope_quality.{{json,md}}, rope_quality_{{ppl,passkey}}.png "
          f"in {time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
