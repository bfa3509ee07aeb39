"""Forward schedules of the block-sparse kernel side by side (issue 9, the 128K bars).

Shape and data as benchmarks/sparse_attention.py: B=1, H=32, H_kv=8, D=128, bf16, blocks of 128, the same random
q/k/v (seeded by S) and its block top-k selection at ``--density`` (default 0.1). For each variant of
``hf_longctx.kernels.block_sparse.FWD_VARIANTS`` (benchmarks/NOTES-sparse.md says what each changes): its output
and LSE are first checked against the "in-loop" schedule (the original kernel) on the same inputs (max abs differences; a variant that
disagrees is reported and not timed), then the kernel alone is timed with ``triton.testing.do_bench`` (median). The
estimation (``block_topk_index``) is timed once per length, so each row also shows estimation + kernel against the
bars, whose baselines (cuDNN dense, FlexAttention on the same blocks) are the committed H100 measurements of
results/sparse_attention.md (not re-measured here; ``--dense`` adds our dense kernel for the per-block ratio).

    PYTHONPATH=. python benchmarks/sparse_variants.py OUTDIR [--variants a,b] [--seqs 131072,32768]
                                                             [--budget-s 200] [--dense] [--smoke]

Every part is guarded: a failure is logged (OUTDIR/sparse_variants.log) and the run goes on; parts that would
start past ``--budget-s`` are skipped and listed. Writes OUTDIR/sparse_variants.csv (one row per measurement,
appended as measured) and OUTDIR/sparse_variants.md (rewritten after every length, printed last).
``--smoke``: a CPU dry run through the Triton interpreter (TRITON_INTERPRET=1), tiny shapes, wall-clock times.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (GuardedParts, append_csv, median_ms, random_qkv, run_info, start_csv,  # noqa: E402
                     write_markdown)

H, H_KV, D, BLOCK = 32, 8, 128, 128
# Committed H100 baselines (results/sparse_attention.md, torch 2.11, triton 3.6): cuDNN dense causal and
# FlexAttention on the same blocks, ms; the bars: (baseline, factor) -> estimation + kernel <= baseline / factor.
BASELINE_MS = {(32768, "sdpa-cudnn"): 14.1498, (131072, "sdpa-cudnn"): 244.977, (32768, "flex"): 2.6252,
               (131072, "flex"): 36.1048}
BARS = {32768: [("sdpa-cudnn", 3.0)], 131072: [("sdpa-cudnn", 9.0), ("flex", 1.3)]}
# Variants in timing order: the most promising first, so that a time limit only loses the rest.
REFERENCE = "in-loop"  # the original kernel (_fwd_kernel): every other schedule is checked against it
DEFAULT_VARIANTS = ["in-loop", "prefetch", "prefetch-tma", "prefetch-grouped", "prefetch-tma-grouped", "prefetch-s2"]
SMOKE = {"H": 4, "H_KV": 2, "D": 32, "BLOCK": 16, "seqs": "112", "density": 0.3}
FIELDS = ["device", "torch", "triton", "transformers", "seq", "provider", "median_ms", "tflops", "density",
          "vs_default", "total_ms", "bars", "check", "note"]


def bar_text(S: int, total_ms: float | None) -> str:
    """'cuDNN/ours = 6.6x (bar 9x: FAIL); ...' for estimation + kernel = ``total_ms``."""
    if total_ms is None:
        return ""
    parts = []
    for name, factor in BARS.get(S, []):
        base = BASELINE_MS.get((S, name))
        if base:
            ratio = base / total_ms
            parts.append(f"{name}/ours {ratio:.2f}x (bar {factor}x: {'pass' if ratio >= factor else 'FAIL'})")
    return "; ".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="results directory")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    ap.add_argument("--seqs", default=None, help="default 131072,32768 (smoke: 112)")
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--budget-s", type=float, default=200.0, help="skip parts that would start after this")
    ap.add_argument("--dense", action="store_true",
                    help="also time our dense kernel (sink kernel, dense causal, its H100 config: BLOCK_N 128, "
                         "8 warps, 3 stages, no autotuning) for the time per computed block, variant / dense "
                         "(bar <= 1.25)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU dry run through the Triton interpreter (TRITON_INTERPRET=1): tiny shapes")
    args = ap.parse_args(argv)

    from hf_longctx.kernels import block_sparse as bsp
    from hf_longctx.kernels import sink_window as sw
    from hf_longctx.sparse import block_topk_index

    heads, kv_heads, dim, block = H, H_KV, D, BLOCK
    dev, dtype, seqs, density = "cuda", torch.bfloat16, args.seqs or "131072,32768", args.density
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--smoke needs TRITON_INTERPRET=1 (the Triton interpreter on CPU)")
        heads, kv_heads, dim, block = SMOKE["H"], SMOKE["H_KV"], SMOKE["D"], SMOKE["BLOCK"]
        dev, dtype, seqs, density = "cpu", torch.float32, args.seqs or SMOKE["seqs"], SMOKE["density"]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in bsp.FWD_VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {sorted(bsp.FWD_VARIANTS)}")
    if REFERENCE in variants:  # the reference of the output check: first
        variants.remove(REFERENCE)
    variants.insert(0, REFERENCE)

    parts = GuardedParts(args.out, "sparse_variants", args.budget_s, traceback_limit=4)
    log, over_budget, guarded = parts.log, parts.over_budget, parts.guarded
    info = run_info(args.smoke)
    log(f"# {info}; variants {variants}; budget {args.budget_s} s")
    rows: list[dict] = []
    csv_path = os.path.join(args.out, "sparse_variants.csv")
    start_csv(csv_path, FIELDS)

    def record(S, provider, ms, flops=None, dens=None, vs_default=None, total=None, check="", note=""):
        row = dict(info, seq=S, provider=provider, median_ms=None if ms is None else round(ms, 4),
                   tflops=None if ms is None or not flops else round(flops / ms / 1e9, 1),
                   density=None if dens is None else round(dens, 4),
                   vs_default=None if vs_default is None else round(vs_default, 3),
                   total_ms=None if total is None else round(total, 3), bars=bar_text(S, total), check=check,
                   note=note)
        rows.append(row)
        append_csv(csv_path, FIELDS, row)
        log(f"  S={S:>6} {provider:28s} {row['median_ms']} ms {row['tflops']} TFLOP/s  x{row['vs_default']} "
            f"total {row['total_ms']}  {row['bars']}  {check} {note}")

    def time_ms(fn, S):
        return median_ms(fn, args.smoke, warmup=25 if S < 100000 else 5, rep=200 if S < 100000 else 600)

    def run_length(S):
        """Estimation, then every variant (checked, timed), then optionally the dense kernel, at length S."""
        # the data of benchmarks/sparse_attention.py
        q, k, v = random_qkv(S, S, heads, kv_heads, dim, dev, dtype, seed=S)
        n = -(-S // block)
        causal_blocks = heads * n * (n + 1) / 2
        dense_flops = 2.0 * S * (S + 1) * dim * heads

        def est():
            return block_topk_index(q, k, block_size=block, density=density)

        index = est()
        sparse_density = float((index.kv_num_blocks + index.full_kv_num_blocks).sum()) / causal_blocks
        sparse_flops = dense_flops * sparse_density
        est_ms = guarded(f"estimate S={S}", lambda: time_ms(est, S))
        record(S, "estimate", est_ms, note="block_topk_index alone")

        def kernel(name):
            def run():
                with torch.no_grad(), bsp.forward_variant(name):
                    return bsp.block_sparse_attention_triton(q, k, v, index.kv_num_blocks, index.kv_indices,
                                                             return_lse=True, **index.kernel_kwargs())
            return run

        base = guarded(f"{REFERENCE} S={S}", kernel(REFERENCE))
        base_ms = None
        for name in variants:
            if over_budget(f"{name} S={S}"):
                continue

            def one(name=name):
                nonlocal base_ms
                fn = kernel(name)
                check = ""
                if name != REFERENCE:
                    if base is None:
                        check = f"no {REFERENCE} output to compare"
                    else:
                        out, lse = fn()
                        finite = torch.isfinite(base[1])
                        err = (out.float() - base[0].float()).abs().max().item()
                        err_lse = (lse[finite] - base[1][finite]).abs().max().item()
                        same_inf = torch.equal(torch.isfinite(lse), finite)
                        check = f"max|out-ref|={err:.2e} max|lse-ref|={err_lse:.2e}"
                        del out, lse
                        if not (err <= 1e-2 and err_lse <= 1e-3 and same_inf):  # one math, bf16 outputs
                            record(S, f"kernel[{name}]", None, check=check, note="CHECK FAILED, not timed")
                            return
                t = time.time()
                ms = time_ms(fn, S)
                if name == REFERENCE:
                    base_ms = ms
                total = ms + est_ms if est_ms is not None else None
                record(S, f"kernel[{name}]", ms, sparse_flops, sparse_density,
                       vs_default=base_ms / ms if base_ms else None, total=total, check=check,
                       note=f"compile+time {time.time() - t:.0f} s")
            guarded(f"{name} S={S}", one)
        if args.dense and not over_budget(f"ours-dense S={S}"):
            def dense():
                if not args.smoke:  # the config autotuning picked on the H100 (results/sink_attention.md): no tuning
                    import triton
                    full_space = sw._configs
                    sw._configs = lambda kind, hd: ([triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3)]
                                                    if kind == "fwd" and hd < 256 else full_space(kind, hd))
                ms = time_ms(lambda: sw.sink_window_attention_triton(q, k, v, sink_tokens=0, window=None), S)
                record(S, "ours-dense", ms, dense_flops,
                       note="sink kernel, dense causal (BLOCK_N 128, 8 warps, 3 stages)")
                per_dense = ms / causal_blocks
                for r in [r for r in rows if r["seq"] == S and r["provider"].startswith("kernel[") and r["median_ms"]]:
                    ratio = r["median_ms"] / (sparse_density * causal_blocks) / per_dense
                    record(S, f"per-block-ratio[{r['provider'][7:-1]}]", ratio,
                           note="kernel ms per computed block / dense ms per causal block (bar <= 1.25)")
            guarded(f"ours-dense S={S}", dense)

    for S in [int(x) for x in seqs.split(",") if x]:
        if over_budget(f"S={S}"):
            continue
        guarded(f"S={S}", lambda S=S: run_length(S))
        if dev == "cuda":
            torch.cuda.empty_cache()
        write_md(args.out, info, rows, parts.skipped, density)

    log(f"total {time.time() - parts.started:.0f} s")
    md = write_md(args.out, info, rows, parts.skipped, density)
    print(md)
    return 0


def write_md(out_dir, info, rows, skipped, density) -> str:
    lines = [f"# Block-sparse forward variants ({info['device']}; torch {info['torch']}, triton {info['triton']}, "
             f"transformers {info['transformers']})", "",
             f"B=1, H={H}, H_kv={H_KV}, D={D}, bf16, blocks {BLOCK}, block top-k at density {density} "
             "(benchmarks/sparse_attention.py's data); kernel alone, do_bench medians. total = estimation + kernel; "
             "bars against the committed baselines of results/sparse_attention.md (cuDNN dense, Flex on the same "
             f"blocks). x {REFERENCE} = {REFERENCE} ms / variant ms; ref = the {REFERENCE} schedule.", "",
             f"| S | provider | median ms | TFLOP/s | density | x {REFERENCE} | total ms | bars | check | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seq']} | {r['provider']} | {r['median_ms']} | {r['tflops'] or ''} | "
                     f"{r['density'] or ''} | {r['vs_default'] or ''} | {r['total_ms'] or ''} | {r['bars']} | "
                     f"{r['check']} | {r['note']} |")
    return write_markdown(os.path.join(out_dir, "sparse_variants.md"), lines, skipped)


if __name__ == "__main__":
    sys.exit(main())
