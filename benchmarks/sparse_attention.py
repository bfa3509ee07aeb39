"""Dynamic block-sparse prefill (issue 9): our estimation + Triton kernel against dense and FlexAttention.

Shape: B=1, H=32, H_kv=8, D=128, bf16, S = 32K / 64K / 128K, block top-k at ``--density`` (default 0.1) of the
causal blocks. Providers (``triton.testing.do_bench`` medians, random data, warm-up first):
- ``ours-est``: block_topk_index alone; ``ours-kernel``: the kernel on its selection; ``ours``: both;
- ``ours-est-mass``: block_topk_index by mass 0.95; ``ours-vs-est``: vertical_slash_index at the same density
  (estimation only, for reference);
- ``ours-dense``: our sink kernel in dense causal mode; ``sdpa-cudnn`` / ``sdpa-flash``: SDPA dense causal (K/V
  repeated outside the timing);
- ``flex``: compiled FlexAttention on the SAME blocks (``SparseIndex.block_mask``: BlockMask.from_kv_blocks on our
  lists, no S x S; checked against our selection with ``to_dense`` first); ``flex-mask``: building that BlockMask.
Per computed block: ours-kernel ms / computed blocks vs ours-dense ms / causal blocks (bar: within 1.25x).

Isolation: the parent process runs each (length, group) in a child process with its own time limit: first the
``core`` group (everything but Flex) for every length, then the ``flex`` group for every length. A device-side
assert or a hang in one child loses that child's remaining rows only. Every row is appended to the CSV as it is
measured and the markdown is rewritten from the CSV after every row.

    PYTHONPATH=. python benchmarks/sparse_attention.py --out results_dir [--deadline-s 420]

Writes ``sparse_attention.csv``, ``sparse_attention.md`` and one ``child-<group>-<S>.log`` per child into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import subprocess
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sink_attention import versions  # noqa: E402

H, H_KV, D, BLOCK = 32, 8, 128, 128
FIELDS = ["time", "device", "torch", "triton", "transformers", "seq", "provider", "median_ms", "tflops", "density",
          "note"]
GROUPS = ("core", "flex")
CHILD_LIMIT_S = {"core": 150, "flex": 120}
BARS = ((131072, "sdpa-cudnn", 9.0), (131072, "flex", 1.3), (32768, "sdpa-cudnn", 3.0))


def read_rows(csv_path: str) -> dict:
    """{(seq, provider): row} from the CSV, the last row of each pair winning."""
    table: dict = {}
    if os.path.exists(csv_path):
        with open(csv_path, newline="") as f:
            for row in csv.DictReader(f):
                table[(int(row["seq"]), row["provider"])] = row
    return table


def _ms(table, S, provider):
    try:
        value = float(table[(S, provider)]["median_ms"])
    except (KeyError, ValueError):
        return None
    return value if value == value else None  # NaN: failed


def render(csv_path: str, density: float) -> str:
    """The markdown table and the acceptance ratios of everything measured so far."""
    table = read_rows(csv_path)
    first = next(iter(table.values()), None)
    head = (f"device {first['device']}; torch {first['torch']}, triton {first['triton']}, transformers "
            f"{first['transformers']}." if first else "nothing measured yet.")
    lines = [f"# Block-sparse prefill (issue 9), block top-k at density {density}", "",
             f"{head} B=1 H={H} H_kv={H_KV} D={D} bf16, blocks {BLOCK}. Median ms (TFLOP/s of the work done).", "",
             "| S | provider | ms | TFLOP/s | density | note |", "|---|---|---|---|---|---|"]
    for (S, provider), row in sorted(table.items(), key=lambda item: item[0][0]):
        lines.append(f"| {S} | {provider} | {row['median_ms']} | {row['tflops']} | {row['density']} | "
                     f"{row['note']} |")
    lines += ["", "Acceptance (their ms / our ms, estimation + kernel; per-block: ours / dense, bar <= 1.25):", ""]
    for S, other, bar in BARS:
        ours, theirs = _ms(table, S, "ours"), _ms(table, S, other)
        if ours and theirs:
            ratio = theirs / ours
            lines.append(f"- S={S}: {other} / ours = {ratio:.2f} (bar {bar}): {'pass' if ratio >= bar else 'FAIL'}")
        else:
            lines.append(f"- S={S}: {other} / ours: not measured")
    for S in sorted({s for s, _ in table}):
        ratio = _ms(table, S, "per-block-ratio")
        if ratio:
            lines.append(f"- S={S}: time per computed block, ours / ours-dense = {ratio:.3f} (bar 1.25): "
                         f"{'pass' if ratio <= 1.25 else 'FAIL'}")
    return "\n".join(lines) + "\n"


class Writer:
    """Appends one CSV row per measurement and rewrites the markdown after each."""

    def __init__(self, out: str, density: float):
        self.out, self.density = out, density
        self.csv_path = os.path.join(out, "sparse_attention.csv")
        try:
            self.info = versions()
        except (RuntimeError, AssertionError):  # no CUDA device: a dry run of the orchestration
            self.info = {"device": "none", "torch": torch.__version__, "triton": "", "transformers": ""}
        if not os.path.exists(self.csv_path):
            with open(self.csv_path, "w", newline="") as f:
                csv.DictWriter(f, fieldnames=FIELDS).writeheader()

    def record(self, S, provider, ms, flops=None, density=None, note=""):
        row = dict(time=_dt.datetime.now().isoformat(timespec="seconds"), **self.info, seq=S, provider=provider,
                   median_ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1) if flops and ms == ms else "",
                   density=round(density, 4) if density is not None else "", note=note)
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=FIELDS).writerow(row)
        with open(os.path.join(self.out, "sparse_attention.md"), "w") as f:
            f.write(render(self.csv_path, self.density))
        print(row, flush=True)
        return row


def bench(fn, S):
    import triton

    return triton.testing.do_bench(fn, warmup=25 if S < 100000 else 5, rep=200 if S < 100000 else 600,
                                   return_mode="median")


def run_group(group: str, S: int, density: float, writer: Writer) -> None:
    """Measure one group of providers at one length, in this process (a child of the parent run)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hf_longctx.kernels import block_sparse, reference_sparse, sink_window
    from hf_longctx.sparse import block_topk_index, vertical_slash_index

    gen = torch.Generator(device="cuda").manual_seed(S)
    q = torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, H_KV, S, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, H_KV, S, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    dense_flops = 2.0 * S * (S + 1) * D * H
    n = -(-S // BLOCK)
    causal_blocks = H * n * (n + 1) / 2

    def est():
        return block_topk_index(q, k, block_size=BLOCK, density=density)

    index = est()
    computed = float((index.kv_num_blocks + index.full_kv_num_blocks).sum())
    sparse_density = computed / causal_blocks
    sparse_flops = dense_flops * sparse_density

    def kernel():
        return block_sparse.block_sparse_attention_triton(q, k, v, index.kv_num_blocks, index.kv_indices,
                                                          **index.kernel_kwargs())

    steps = []
    if group == "core":
        def ours():
            i = est()
            return block_sparse.block_sparse_attention_triton(q, k, v, i.kv_num_blocks, i.kv_indices,
                                                              **i.kernel_kwargs())

        steps += [("ours-est", est, None), ("ours-kernel", kernel, sparse_flops), ("ours", ours, sparse_flops),
                  ("ours-est-mass", lambda: block_topk_index(q, k, block_size=BLOCK, mass=0.95), None),
                  ("ours-vs-est", lambda: vertical_slash_index(q, k, block_size=BLOCK, density=density), None),
                  ("ours-dense", lambda: sink_window.sink_window_attention_triton(q, k, v, sink_tokens=0, window=None),
                   dense_flops)]
        kr, vr = k.repeat_interleave(H // H_KV, 1), v.repeat_interleave(H // H_KV, 1)
        for name, backend in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
            def sdpa(backend=backend):
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True)
            steps.append((name, sdpa, dense_flops))
    else:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        mask = index.block_mask(S)
        ours_blocks = reference_sparse.selected_blocks(index.kv_num_blocks, index.kv_indices,
                                                       index.full_kv_num_blocks, index.full_kv_indices, n)
        if not torch.equal(mask.to_dense().bool(), ours_blocks):
            raise RuntimeError("BlockMask.to_dense() differs from our selection: Flex not run")
        steps.append(("flex-mask", lambda: index.block_mask(S), None))

        def flex_run():
            return flex(q, k, v, block_mask=mask, enable_gqa=True)
        steps.append(("flex", flex_run, sparse_flops))
    for name, fn, flops in steps:
        try:
            note = ""
            if name == "flex":  # same blocks, same result
                note = f"max abs(flex - ours) = {(fn().float() - kernel().float()).abs().max().item():.3e}"
            else:
                fn()
            torch.cuda.synchronize()
            writer.record(S, name, bench(fn, S), flops, sparse_density if flops == sparse_flops else None, note)
        except Exception as exc:
            traceback.print_exc()
            writer.record(S, name, float("nan"), note=f"failed: {type(exc).__name__} (see child log)")
            if "CUDA error" in str(exc) or "device-side assert" in str(exc):
                raise  # the context is unusable: end this child
    if group == "core":
        table = read_rows(writer.csv_path)
        per_block, per_dense = _ms(table, S, "ours-kernel"), _ms(table, S, "ours-dense")
        if per_block and per_dense:
            writer.record(S, "per-block-ratio", (per_block / computed) / (per_dense / causal_blocks),
                          note="ours-kernel ms/block / ours-dense ms/block")


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", default="32768,65536,131072")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--groups", default="core,flex", help="comma list of: core, flex")
    parser.add_argument("--deadline-s", type=float, default=420.0, help="wall-clock budget of the whole run")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # "<group>:<S>": run in this process
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    writer = Writer(args.out, args.density)
    if args.child:
        group, S = args.child.split(":")
        run_group(group, int(S), args.density, writer)
        return
    groups = [g for g in args.groups.split(",") if g]
    if any(g not in GROUPS for g in groups):
        raise ValueError(f"--groups must be a comma list of {GROUPS}, got {args.groups!r}")
    end = time.monotonic() + args.deadline_s
    for group in groups:
        for S in [int(x) for x in args.lengths.split(",")]:
            limit = min(CHILD_LIMIT_S[group], end - time.monotonic())
            if limit < 20:
                print(f"skip {group} S={S}: deadline", flush=True)
                writer.record(S, f"{group}-skipped", float("nan"), note="not run: deadline")
                continue
            log_path = os.path.join(args.out, f"child-{group}-{S}.log")
            cmd = [sys.executable, os.path.abspath(__file__), "--out", args.out, "--density", str(args.density),
                   "--child", f"{group}:{S}"]
            t0 = time.monotonic()
            with open(log_path, "w") as log:
                try:
                    rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=limit).returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
            print(f"{group} S={S}: rc={rc} in {time.monotonic() - t0:.0f} s (log {log_path})", flush=True)
            if rc != 0:
                with open(log_path) as log:
                    print("".join(log.readlines()[-15:]), flush=True)
    print(render(writer.csv_path, args.density))


if __name__ == "__main__":
    main()
