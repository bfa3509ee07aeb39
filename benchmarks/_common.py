"""Pieces shared by the benchmark scripts (imported from the benchmarks folder, not run).

- ``comma_list``: the argparse type of the comma-separated options;
- the quality scripts that run ``hf-longctx eval`` processes (rope_quality.py, sink_quality.py): their
  arguments, the parallel runner, the collected results, the markdown tables and plots vs context length;
- the kernel variant timings (sink_variants.py, sparse_variants.py): the guarded, time-budgeted parts with
  their log, the seeded random q/k/v, the timing, the appended CSV and the markdown file.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from hf_longctx.eval import report


def comma_list(cast):
    """An argparse ``type``: takes a cast (``int``, ``float``, ``str``), returns the function that turns
    ``"a,b,c"`` into ``[cast("a"), cast("b"), cast("c")]`` (empty items dropped)."""
    return lambda text: [cast(item) for item in text.split(",") if item.strip()]


# ---- quality through ``hf-longctx eval`` processes ----------------------------------------------------------


def parse_eval_args(argv: list[str] | None, description: str, configs_flag: str, configs: dict, dtype: str,
                    jobs: int) -> argparse.Namespace:
    """Parse the options of a quality script (``argv``; None: the command line).

    ``configs_flag`` (e.g. ``"--methods"``) selects among ``configs`` (name -> ``--longctx`` spec), all of them by
    default; ``dtype`` and ``jobs`` are the defaults of ``--dtype`` and ``--jobs``. Returns the namespace (the
    selection under the flag's name, e.g. ``args.methods``); an unknown name is a usage error.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="results directory")
    parser.add_argument("--model", default="model_cards/longctx-target-20m")
    parser.add_argument(configs_flag, type=comma_list(str), default=list(configs), help=f"any of {', '.join(configs)}")
    parser.add_argument("--ppl-multiples", type=comma_list(float), default=[1, 2, 4, 8, 16])
    parser.add_argument("--passkey-multiples", type=comma_list(float), default=[1, 2, 4, 8])
    parser.add_argument("--ppl-samples", type=int, default=4)
    parser.add_argument("--passkey-samples", type=int, default=5)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=dtype)
    parser.add_argument("--jobs", type=int, default=jobs, help="eval processes run side by side")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs hf-longctx eval")
    args = parser.parse_args(argv)
    unknown = sorted(set(getattr(args, configs_flag[2:].replace("-", "_"))) - set(configs))
    if unknown:
        parser.error(f"{configs_flag}: unknown {', '.join(unknown)}; known: {', '.join(configs)}")
    return args


def eval_command(args: argparse.Namespace, name: str, task: str, longctx: str | None) -> list[str]:
    """The ``hf-longctx eval`` command line of configuration ``name`` on ``task`` (``"ppl"`` or ``"passkey"``),
    its files in ``OUT/<name>/``; ``longctx`` is its ``--longctx`` value (None: the stock model)."""
    multiples = args.ppl_multiples if task == "ppl" else args.passkey_multiples
    samples = args.ppl_samples if task == "ppl" else args.passkey_samples
    words = [args.python, "-m", "hf_longctx.cli", "eval", args.model, "--output", str(Path(args.out) / name),
             "--task", task, "--multiples", ",".join(f"{m:g}" for m in multiples), "--samples", str(samples),
             "--dtype", args.dtype]
    if args.device:
        words += ["--device", args.device]
    if longctx is not None:
        words += ["--longctx", longctx]
    return words


def run_eval(args: argparse.Namespace, name: str, task: str, longctx: str | None) -> tuple[str, str, float, int]:
    """Run one eval process (``eval_command``), its output in ``OUT/<name>/<task>.log``; returns
    (name, task, seconds, exit code)."""
    folder = Path(args.out) / name
    folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(folder / f"{task}.log", "w") as log:
        code = subprocess.call(eval_command(args, name, task, longctx), stdout=log, stderr=subprocess.STDOUT)
    return name, task, time.time() - started, code


def run_evals(args: argparse.Namespace, jobs: list[tuple[str, str]], feature: str,
              specs: dict[str, str | None]) -> bool:
    """Run the (name, task) ``jobs`` in that order, ``args.jobs`` processes side by side, each name with
    ``--longctx FEATURE=specs[name]`` (a None spec: the stock model); prints one line per finished job.
    Returns True when all succeeded, else False after printing the logs of the failed ones."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    longctx = {name: None if spec is None else f"{feature}={spec}" for name, spec in specs.items()}
    failed = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for name, task, seconds, code in pool.map(lambda job: run_eval(args, *job, longctx[job[0]]), jobs):
            print(f"{name:>13} {task:<8} {seconds:6.1f}s {'ok' if code == 0 else f'FAILED (exit {code})'}",
                  flush=True)
            if code:
                failed.append(str(out / name / f"{task}.log"))
    if failed:
        print("failed runs, see: " + ", ".join(failed))
    return not failed


def collect_evals(out: Path, specs: dict[str, str | None], commands: bool = False) -> dict:
    """Read ``OUT/<name>/{ppl,passkey}.json`` of each name of ``specs`` (name -> spec shown in the tables).

    Returns {name: spec, ppl_lengths, perplexity, passkey_lengths, passkey (mean accuracy over depths),
    training_length, commands (the two command lines; only with ``commands``), metadata}.
    """
    results = {}
    for name, spec in specs.items():
        ppl = json.loads((out / name / "ppl.json").read_text())
        passkey = json.loads((out / name / "passkey.json").read_text())
        results[name] = {
            "spec": spec,
            "ppl_lengths": ppl["lengths"],
            "perplexity": ppl["perplexity"],
            "passkey_lengths": passkey["lengths"],
            "passkey": [sum(row) / len(row) for row in passkey["accuracy"]],
            "training_length": ppl["training_length"],
        }
        if commands:
            results[name]["commands"] = {"ppl": ppl["command"], "passkey": passkey["command"]}
        results[name]["metadata"] = ppl["metadata"]
    return results


def length_table(results: dict, key: str, name_header: str, feature: str) -> str:
    """Markdown table of ``collect_evals`` results: one row per name (its ``--longctx FEATURE=`` spec, or '-', then
    ``results[name][key]`` to 2 decimals), one column per length of ``key`` (``"perplexity"`` or ``"passkey"``) as a
    multiple of the trained length."""
    first = next(iter(results.values()))
    lengths = first["ppl_lengths"] if key == "perplexity" else first["passkey_lengths"]
    multiples = [report.length_multiple(n, first["training_length"]) for n in lengths]
    header = [name_header, f"--longctx {feature}=", *multiples]
    rows = [[name, r["spec"] or "-", *(f"{value:.2f}" for value in r[key])] for name, r in results.items()]
    return report.markdown_table(header, rows)


def quality_markdown(results: dict, subject: str, name_header: str, feature: str, closing: list[str]) -> str:
    """The markdown page of ``collect_evals`` results: title (``subject`` on the model), device and versions,
    the perplexity and passkey tables (``length_table``), then the ``closing`` lines."""
    first = next(iter(results.values()))
    meta = first["metadata"]
    return "\n".join([
        f"# {subject} on longctx-target-20m (trained at {first['training_length']} tokens)",
        "",
        f"Device {meta['device']}, dtype {meta['dtype']}, versions {meta['versions']}.",
        "",
        "## Perplexity (held-out text) vs context length",
        "",
        length_table(results, "perplexity", name_header, feature),
        "",
        "## Passkey accuracy (mean over depths) vs context length",
        "",
        length_table(results, "passkey", name_header, feature),
        "",
        *closing,
    ])


def write_quality(out: Path, prefix: str, results: dict, markdown: str, started: float) -> None:
    """Write ``OUT/<prefix>.json`` (``results``), ``.md`` (``markdown``) and ``<prefix>_ppl.png``,
    ``<prefix>_passkey.png`` (one line per name vs context length); print the markdown and the time since
    ``started``."""
    (out / f"{prefix}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{prefix}.md").write_text(markdown + "\n")
    first = next(iter(results.values()))
    report.line_plot(out / f"{prefix}_ppl.png", first["ppl_lengths"],
                     {name: r["perplexity"] for name, r in results.items()}, xlabel="context length (tokens)",
                     ylabel="perplexity", title="Perplexity vs length, longctx-target-20m",
                     marker_x=first["training_length"], logy=True)
    report.line_plot(out / f"{prefix}_passkey.png", first["passkey_lengths"],
                     {name: r["passkey"] for name, r in results.items()}, xlabel="context length (tokens)",
                     ylabel="passkey accuracy", title="Passkey vs length, longctx-target-20m",
                     marker_x=first["training_length"], ylim=(-0.05, 1.05))
    print(f"\n{markdown}\n\nwrote {out}/{prefix}.{{json,md}}, {prefix}_{{ppl,passkey}}.png "
          f"in {time.time() - started:.0f}s")


# ---- kernel variant timings -----------------------------------------------------------------------------------


class GuardedParts:
    """The parts of one timing run: ``log`` prints a line and appends it to ``OUT_DIR/<name>.log``;
    ``over_budget`` skips (and lists in ``skipped``) a part that would start ``budget_s`` after ``started``;
    ``guarded`` runs a part so that a failure is logged (its last ``traceback_limit`` frames), not raised."""

    def __init__(self, out_dir: str, name: str, budget_s: float, traceback_limit: int):
        self.started = time.time()
        os.makedirs(out_dir, exist_ok=True)
        self.file = open(os.path.join(out_dir, f"{name}.log"), "a")
        self.budget_s = budget_s
        self.traceback_limit = traceback_limit
        self.skipped: list[str] = []

    def log(self, msg: str) -> None:
        """Print ``msg`` and append it to the log file."""
        print(msg, flush=True)
        self.file.write(msg + "\n")
        self.file.flush()

    def over_budget(self, part: str) -> bool:
        """True (and ``part`` logged and listed as skipped) when the time budget is spent."""
        if time.time() - self.started > self.budget_s:
            self.skipped.append(part)
            self.log(f"skipped (budget): {part}")
            return True
        return False

    def guarded(self, part: str, fn):
        """``fn()``, or None when it raises (the failure logged, the CUDA cache emptied)."""
        try:
            return fn()
        except Exception as exc:
            self.log(f"FAILED {part}: {type(exc).__name__}: {str(exc)[:400]}")
            self.log(traceback.format_exc(limit=self.traceback_limit))
            torch.cuda.empty_cache()
            return None


def run_info(smoke: bool) -> dict:
    """{device, torch, triton, transformers} of the CSV rows: ``sink_attention.versions()`` on the GPU, a
    placeholder for the interpreter smoke run (``smoke``)."""
    if smoke:
        return {"device": "cpu (interpreter smoke run)", "torch": torch.__version__, "triton": "interpreter",
                "transformers": "n/a"}
    from sink_attention import versions

    return versions()


def random_qkv(q_len: int, kv_len: int, heads: int, kv_heads: int, dim: int, device: str, dtype: torch.dtype,
               seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standard normal q (1, heads, q_len, dim), then k and v (1, kv_heads, kv_len, dim), drawn in that order from
    one generator on ``device`` seeded with ``seed``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, heads, q_len, dim, device=device, dtype=dtype, generator=gen)
    k = torch.randn(1, kv_heads, kv_len, dim, device=device, dtype=dtype, generator=gen)
    v = torch.randn(1, kv_heads, kv_len, dim, device=device, dtype=dtype, generator=gen)
    return q, k, v


def median_ms(fn, smoke: bool, warmup: int, rep: int) -> float:
    """Milliseconds of ``fn()``, called once first (compiles and autotunes outside the timing): one wall-clock call
    in a smoke run, else the median of ``triton.testing.do_bench(fn, warmup, rep)`` (both in ms)."""
    fn()
    if smoke:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from triton.testing import do_bench

    torch.cuda.synchronize()
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def start_csv(path: str, fields: list[str]) -> None:
    """Write the header row of a new CSV at ``path``; an existing one is kept, rows are appended to it."""
    if not os.path.exists(path):
        with open(path, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=fields).writeheader()


def append_csv(path: str, fields: list[str], row: dict) -> None:
    """Append ``row`` (a dict with the keys ``fields``) to the CSV at ``path``."""
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=fields).writerow(row)


def write_markdown(path: str, lines: list[str], skipped: list[str]) -> str:
    """Write ``lines`` (then the parts ``skipped`` for the time budget, if any) as the markdown file ``path``;
    returns its text."""
    if skipped:
        lines = lines + ["", "Skipped (time budget): " + ", ".join(skipped)]
    md = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(md)
    return md
