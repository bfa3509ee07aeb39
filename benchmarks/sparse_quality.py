"""Quality of dynamic block-sparse prefill on the reference target (issue 9), against dense attention.

Model: ``model_cards/longctx-target-20m`` (trained at 1024 tokens), patched with ``rope=--rope`` (default
``dynamic_yarn:32``, which holds perplexity and passkey to 16x in benchmarks/results/rope_quality.md) so that
8K-32K is meaningful. For each length, the same inputs run with dense attention (``min_seq_len`` above the length)
and sparse (``min_seq_len=1024``, pattern from ``--pattern``, ``--density``):
- per-layer relative error ||sparse - dense|| / ||dense|| of each attention module's output (end to end: each run
  propagates its own hidden states);
- perplexity (next-token NLL on held-out windows, ``hf_longctx.eval.perplexity``) and its delta;
- passkey accuracy (``hf_longctx.eval.passkey`` prompts, key at several depths; correct when every answer token
  is the argmax under teacher forcing).

    PYTHONPATH=. python benchmarks/sparse_quality.py --out benchmarks/results/sparse_quality

Writes ``sparse_quality.json`` and ``sparse_quality.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import traceback

import torch

import hf_longctx as lc
from hf_longctx.eval.passkey import passkey_text, random_passkey
from hf_longctx.eval.perplexity import heldout_windows, window_nll


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="model_cards/longctx-target-20m")
    parser.add_argument("--lengths", default="8192,16384,32768")
    parser.add_argument("--rope", default="dynamic_yarn:32")
    parser.add_argument("--pattern", default="block_topk")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--passkeys", type=int, default=5)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    from transformers import AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = lc.from_pretrained(args.model, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    lengths = [int(x) for x in args.lengths.split(",")]
    _, windows = heldout_windows(tokenizer, lengths, 1, device=device)
    attn_modules = [m for m in model.modules() if hasattr(m, "num_key_value_groups")]
    results = {"model": args.model, "rope": args.rope, "pattern": args.pattern, "density": args.density,
               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "lengths": {}}

    def configure(sparse: bool, length: int):
        feature = lc.SparseAttention(pattern=args.pattern, density=args.density,
                                     min_seq_len=1024 if sparse else length + 1)
        lc.patch(model, attention=feature, rope=args.rope)

    def run_outputs(ids):
        outs = []
        hooks = [m.register_forward_hook(lambda mod, inp, out: outs.append(out[0].float())) for m in attn_modules]
        try:
            with torch.no_grad():
                nll = window_nll(model, ids)
        finally:
            for h in hooks:
                h.remove()
        return outs, float(nll.mean())

    def passkey_acc(length: int) -> float:
        rng = random.Random(length)
        hits = 0
        for trial in range(args.passkeys):
            key = random_passkey(rng)
            per_copy = max(1, len(tokenizer(passkey_text(50, 0.5, key)[0]).input_ids) // 50)
            filler = max(1, (length - 64) // per_copy)
            prompt, answer = passkey_text(filler, (trial + 0.5) / args.passkeys, key)
            p_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
            a_ids = tokenizer(answer, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
            ids = torch.cat([p_ids, a_ids], 1)
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, p_ids.shape[1] - 1:-1]
            hits += int(bool((logits.argmax(-1) == a_ids[0]).all()))
        return hits / args.passkeys

    for length in lengths:
        entry = {}
        try:
            ids = windows[length]
            configure(False, length)
            dense_out, dense_nll = run_outputs(ids)
            dense_pk = passkey_acc(length)
            configure(True, length)
            sparse_out, sparse_nll = run_outputs(ids)
            sparse_pk = passkey_acc(length)
            rel = [float((s - d).norm() / d.norm()) for s, d in zip(sparse_out, dense_out)]
            entry = {"ppl_dense": float(torch.tensor(dense_nll).exp()), "ppl_sparse": float(torch.tensor(sparse_nll).exp()),
                     "passkey_dense": dense_pk, "passkey_sparse": sparse_pk, "layer_rel_error": rel}
        except Exception as exc:
            traceback.print_exc()
            entry = {"error": repr(exc)}
        results["lengths"][length] = entry
        print(length, entry, flush=True)
    with open(os.path.join(args.out, "sparse_quality.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = [f"# Block-sparse prefill quality ({args.pattern}, density {args.density}) vs dense",
             "", f"{args.model}, rope {args.rope}, device {results['device']}.", "",
             "| length | ppl dense | ppl sparse | delta | passkey dense | passkey sparse | per-layer rel. error |",
             "|---|---|---|---|---|---|---|"]
    for length, e in results["lengths"].items():
        if "error" in e:
            lines.append(f"| {length} | failed: {e['error'][:80]} | | | | | |")
            continue
        errs = ", ".join(f"{x:.3f}" for x in e["layer_rel_error"])
        lines.append(f"| {length} | {e['ppl_dense']:.3f} | {e['ppl_sparse']:.3f} | "
                     f"{e['ppl_sparse'] - e['ppl_dense']:+.3f} | {e['passkey_dense']:.2f} | {e['passkey_sparse']:.2f} | "
                     f"{errs} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "sparse_quality.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
