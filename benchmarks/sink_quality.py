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

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hf_longctx.eval import report

VARIANTS = {
    "stock": None,
    "window": "sink:1024,0",
    "sink": "sink:1020,4",
    "lm_infinite": "sink:1020,4,distance_limit=1023",
    "streaming_llm": "sink:1020,4,positions=cache",
}
TASKS = ("ppl", "passkey")


def _list(cast):
    return lambda text: [cast(item) for item in text.split(",") if item.strip()]


def eval_command(args: argparse.Namespace, variant: str, task: str) -> list[str]:
    """The ``hf-longctx eval`` command line of one (variant, task)."""
    multiples = args.ppl_multiples if task == "ppl" else args.passkey_multiples
    samples = args.ppl_samples if task == "ppl" else args.passkey_samples
    words = [args.python, "-m", "hf_longctx.cli", "eval", args.model, "--output", str(Path(args.out) / variant),
             "--task", task, "--multiples", ",".join(f"{m:g}" for m in multiples), "--samples", str(samples),
             "--dtype", args.dtype]
    if args.device:
        words += ["--device", args.device]
    if VARIANTS[variant] is not None:
        words += ["--longctx", f"attention={VARIANTS[variant]}"]
    return words


def run(args: argparse.Namespace, variant: str, task: str) -> tuple[str, str, float, int]:
    """Run one eval process, its output in ``OUT/<variant>/<task>.log``; (variant, task, seconds, exit code)."""
    folder = Path(args.out) / variant
    folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(folder / f"{task}.log", "w") as log:
        code = subprocess.call(eval_command(args, variant, task), stdout=log, stderr=subprocess.STDOUT)
    return variant, task, time.time() - started, code


def collect(out: Path, variants: list[str]) -> dict:
    """{variant: spec, lengths, perplexities, passkey accuracies (mean over depths), metadata} from the JSONs."""
    results = {}
    for variant in variants:
        ppl = json.loads((out / variant / "ppl.json").read_text())
        passkey = json.loads((out / variant / "passkey.json").read_text())
        results[variant] = {
            "spec": VARIANTS[variant],
            "ppl_lengths": ppl["lengths"],
            "perplexity": ppl["perplexity"],
            "passkey_lengths": passkey["lengths"],
            "passkey": [sum(row) / len(row) for row in passkey["accuracy"]],
            "training_length": ppl["training_length"],
            "commands": {"ppl": ppl["command"], "passkey": passkey["command"]},
            "metadata": ppl["metadata"],
        }
    return results


def to_markdown(results: dict) -> str:
    first = next(iter(results.values()))
    trained = first["training_length"]

    def table(lengths: list[int], key: str, digits: int) -> str:
        header = ["variant", "--longctx attention="] + [report.length_multiple(n, trained) for n in lengths]
        rows = [[name, r["spec"] or "-", *(f"{value:.{digits}f}" for value in r[key])] for name, r in results.items()]
        return report.markdown_table(header, rows)

    meta = first["metadata"]
    return "\n".join([
        f"# Sink/window attention on longctx-target-20m (trained at {trained} tokens)",
        "",
        f"Device {meta['device']}, dtype {meta['dtype']}, versions {meta['versions']}.",
        "",
        "## Perplexity (held-out text) vs context length",
        "",
        table(first["ppl_lengths"], "perplexity", 2),
        "",
        "## Passkey accuracy (mean over depths) vs context length",
        "",
        table(first["passkey_lengths"], "passkey", 2),
        "",
        "A sink/window variant keeps only the sinks and the last window of keys, so it cannot retrieve a passkey",
        "that lies beyond its window: its passkey column measures that, its perplexity the stability past training.",
    ])


def plot(results: dict, out: Path) -> None:
    first = next(iter(results.values()))
    report.line_plot(out / "sink_quality_ppl.png", first["ppl_lengths"],
                     {name: r["perplexity"] for name, r in results.items()}, xlabel="context length (tokens)",
                     ylabel="perplexity", title="Perplexity vs length, longctx-target-20m",
                     marker_x=first["training_length"], logy=True)
    report.line_plot(out / "sink_quality_passkey.png", first["passkey_lengths"],
                     {name: r["passkey"] for name, r in results.items()}, xlabel="context length (tokens)",
                     ylabel="passkey accuracy", title="Passkey vs length, longctx-target-20m",
                     marker_x=first["training_length"], ylim=(-0.05, 1.05))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="results directory")
    parser.add_argument("--model", default="model_cards/longctx-target-20m")
    parser.add_argument("--variants", type=_list(str), default=list(VARIANTS), help=f"any of {', '.join(VARIANTS)}")
    parser.add_argument("--ppl-multiples", type=_list(float), default=[1, 2, 4, 8, 16])
    parser.add_argument("--passkey-multiples", type=_list(float), default=[1, 2, 4, 8])
    parser.add_argument("--ppl-samples", type=int, default=4)
    parser.add_argument("--passkey-samples", type=int, default=5)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--jobs", type=int, default=5, help="eval processes run side by side")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs hf-longctx eval")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    started = time.time()
    failed = []
    jobs = [(variant, task) for task in TASKS for variant in args.variants]  # the 16K perplexity windows first
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for variant, task, seconds, code in pool.map(lambda job: run(args, *job), jobs):
            print(f"{variant:>13} {task:<8} {seconds:6.1f}s {'ok' if code == 0 else f'FAILED (exit {code})'}",
                  flush=True)
            if code:
                failed.append(str(out / variant / f"{task}.log"))
    if failed:
        print("failed runs, see: " + ", ".join(failed))
        return 1
    results = collect(out, args.variants)
    (out / "sink_quality.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = to_markdown(results)
    (out / "sink_quality.md").write_text(markdown + "\n")
    plot(results, out)
    print(f"\n{markdown}\n\nwrote {out}/sink_quality.{{json,md}}, sink_quality_{{ppl,passkey}}.png "
          f"in {time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
