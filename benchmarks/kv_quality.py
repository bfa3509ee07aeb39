"""KV eviction quality on the reference target (issue 5): passkey accuracy and perplexity vs budget, per policy.

Model: ``model_cards/longctx-target-20m`` (Llama, 6 layers, trained at 1024 tokens), bf16 on CUDA, float32 on the
CPU. Contexts beyond the trained length need a RoPE scaling: ``--rope`` (default ``yarn:4``, passkey 1.00 at 2x
and 0.96 at 4x in ``benchmarks/results/rope_quality.md``) is patched in every configuration, the full cache
included, so each row differs from the full-cache row only by its eviction.

Configurations: the full cache (no eviction), then each policy of ``KVEviction`` (streaming, snapkv, h2o, tova,
pyramidkv, kvcrush, think; default parameters: 4 sinks, window 32, pooling 5, every 1; think keeps half the key
channels) at each ``--budgets`` (tokens kept per layer), applied with ``lc.patch(model, rope=..., kv=...)``.

- Passkey: ``hf_longctx.eval.passkey_accuracy`` (greedy ``model.generate`` through the patched model, so the
  prompt is prefilled in one forward and evicted down to the budget before the answer is decoded), prompts of
  about ``context`` tokens, ``--depths`` x ``--passkey-samples`` random keys; the mean accuracy over depths.
- Perplexity: ``--ppl-samples`` held-out windows of ``context`` tokens (``hf_longctx.eval``'s
  ``heldout_windows``: the validation split of the project's corpus) read ``--chunk`` tokens per forward through
  the cache (``stream_nll`` of ``streaming_generation.py``; DynamicCache for the full cache, ``LongCtxCache``
  with the eviction otherwise), so every chunk attends to what the evicting cache kept of the text before it,
  as in decoding; the perplexity of the tokens in the second half of each window (all predicted after the
  cache first exceeded the largest budget), and its ratio to the full cache's.

Writes ``OUT/kv_quality.json`` (every number, per-depth accuracies, device, versions, settings), ``.md``
(tables per context) and ``kv_quality_passkey_<context>.png``, ``kv_quality_ppl_<context>.png`` (metric vs
budget, one line per policy, the full cache as a flat line); they are rewritten after every configuration, and
configurations that would start after ``--max-minutes`` are skipped (and listed). Estimated (not measured)
at about 2 minutes on an H100.

    PYTHONPATH=. python benchmarks/kv_quality.py --out benchmarks/results/kv_quality
    PYTHONPATH=. python benchmarks/kv_quality.py --out /tmp/kvq --tiny      # CPU smoke run (about a minute)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from importlib.metadata import version
from pathlib import Path

import torch
from transformers import AutoTokenizer, DynamicCache

import hf_longctx as lc
from hf_longctx.config import KV_POLICIES, KVEviction
from hf_longctx.eval import PASSKEY_DEPTHS, passkey_accuracy, report
from hf_longctx.eval.perplexity import heldout_windows
from _common import comma_list
from streaming_generation import stream_nll

FULL = "full cache"


def configurations(args) -> list[tuple[str, int | None]]:
    """(policy, budget) in run order: the full cache first (policy FULL, budget None)."""
    return [(FULL, None)] + [(policy, budget) for policy in args.policies for budget in args.budgets]


def patch(model, args, policy: str, budget: int | None) -> KVEviction | None:
    """Apply ``--rope`` and the configuration's eviction to ``model``; returns the eviction (None: full cache)."""
    lc.unpatch(model)
    kv = None if budget is None else KVEviction(policy=policy, budget=budget)
    features = {key: value for key, value in (("rope", args.rope), ("kv", kv)) if value is not None}
    if features:
        lc.patch(model, **features)
    return kv


def evaluate(model, tokenizer, args, context: int, windows: torch.Tensor, policy: str, budget: int | None) -> dict:
    """Passkey accuracy and perplexity of one configuration at one context length."""
    kv = patch(model, args, policy, budget)
    started = time.time()
    passkey = passkey_accuracy(model, tokenizer, [context], depths=args.depths, num_samples=args.passkey_samples,
                               seed=args.seed, show_progress=False)
    scored = []
    for window in windows:
        cache = DynamicCache(config=model.config) if kv is None else lc.LongCtxCache(model, kv=kv)
        scored.append(stream_nll(model, window, args.chunk, cache)[context // 2 - 1 :])
    nll = torch.cat(scored).mean().item()
    return {
        "policy": policy, "budget": budget, "context": context,
        "passkey": passkey.mean_accuracy()[0], "passkey_by_depth": dict(zip(map(str, passkey.depths),
                                                                              passkey.accuracy[0])),
        "prompt_tokens": sum(passkey.prompt_tokens[0]) / len(passkey.prompt_tokens[0]),
        "nll": nll, "perplexity": math.exp(nll), "seconds": round(time.time() - started, 1),
    }


def lookup(results: list[dict], context: int, policy: str, budget: int | None) -> dict | None:
    return next((r for r in results if (r["context"], r["policy"], r["budget"]) == (context, policy, budget)), None)


def to_markdown(args, results: list[dict], skipped: list[str], meta: dict) -> str:
    lines = [
        f"# KV eviction quality on longctx-target-20m (trained at 1024 tokens; rope {args.rope or 'as trained'})", "",
        f"Device {meta['device']}, dtype {meta['dtype']}, versions {meta['versions']}. Command: `{meta['command']}`.",
        "",
        f"Passkey: mean accuracy over depths {', '.join(f'{d:g}' for d in args.depths)}, {args.passkey_samples} "
        f"prompts per depth. Perplexity: {args.ppl_samples} held-out windows, read {args.chunk} tokens per forward "
        "through the cache; tokens of the second half of each window. Budget = tokens kept per layer.",
    ]
    for context in args.contexts:
        full = lookup(results, context, FULL, None)
        header = ["policy", *(f"budget {b}" for b in args.budgets)]

        def table(key: str, fmt: str, relative: bool = False) -> str:
            rows = [[FULL, *([fmt.format(full[key])] * len(args.budgets) if full else [""] * len(args.budgets))]]
            for policy in args.policies:
                cells = []
                for budget in args.budgets:
                    r = lookup(results, context, policy, budget)
                    cell = "" if r is None else fmt.format(r[key])
                    if r is not None and relative and full:
                        cell += f" ({r[key] / full[key]:.2f}x)"
                    cells.append(cell)
                rows.append([policy, *cells])
            return report.markdown_table(header, rows)

        lines += ["", f"## Context {context} tokens", "", "Passkey accuracy:", "", table("passkey", "{:.2f}"), "",
                  "Perplexity (x the full cache's):", "", table("perplexity", "{:.3f}", relative=True)]
    if skipped:
        lines += ["", "Not run (time budget or failure): " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


def plot(args, results: list[dict], out: Path) -> None:
    for context in args.contexts:
        full = lookup(results, context, FULL, None)
        for key, label, logy in (("passkey", "passkey accuracy", False), ("perplexity", "perplexity", True)):
            series = {}
            if full:
                series[FULL] = [full[key]] * len(args.budgets)
            for policy in args.policies:
                values = [lookup(results, context, policy, budget) for budget in args.budgets]
                if all(values):
                    series[policy] = [r[key] for r in values]
            if len(series) > 1:
                report.line_plot(out / f"kv_quality_{key}_{context}.png", args.budgets, series,
                                 xlabel="budget (tokens kept per layer)", ylabel=label,
                                 title=f"KV eviction, context {context}: {label}", logy=logy,
                                 ylim=(-0.05, 1.05) if key == "passkey" else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="results directory")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: a 256-token context, few samples")
    parser.add_argument("--model", default="model_cards/longctx-target-20m")
    parser.add_argument("--rope", default="yarn:4", help="rope feature patched in every configuration ('none': off)")
    parser.add_argument("--contexts", type=comma_list(int), default=None, help="context lengths in tokens (2048)")
    parser.add_argument("--budgets", type=comma_list(int), default=None, help="tokens kept per layer (128,256,512)")
    parser.add_argument("--policies", type=comma_list(str), default=list(KV_POLICIES), help="subset of the policies")
    parser.add_argument("--depths", type=comma_list(float), default=None, help="passkey depths (0,0.25,0.5,0.75,1)")
    parser.add_argument("--passkey-samples", type=int, default=None, help="prompts per depth (4)")
    parser.add_argument("--ppl-samples", type=int, default=None, help="held-out windows (4)")
    parser.add_argument("--chunk", type=int, default=None, help="tokens per forward when reading a window (128)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pass keys")
    parser.add_argument("--device", default=None, help="default: cuda if available (and not --tiny), else cpu")
    parser.add_argument("--max-minutes", type=float, default=None, help="skip configurations after this long (3)")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    pick = lambda value, small, large: value if value is not None else (small if args.tiny else large)  # noqa: E731
    args.contexts = pick(args.contexts, [256], [2048])
    args.budgets = sorted(pick(args.budgets, [48, 96], [128, 256, 512]))
    args.chunk = pick(args.chunk, 64, 128)
    args.max_minutes = pick(args.max_minutes, 15.0, 3.0)
    args.depths = pick(args.depths, [0.5], list(PASSKEY_DEPTHS))
    args.passkey_samples = pick(args.passkey_samples, 1, 4)
    args.ppl_samples = pick(args.ppl_samples, 1, 4)
    args.rope = None if args.rope in ("", "none") else args.rope
    unknown = sorted(set(args.policies) - set(KV_POLICIES))
    if unknown:
        raise ValueError(f"--policies: unknown {', '.join(unknown)}; accepted: {', '.join(KV_POLICIES)}")
    for policy in args.policies:
        for budget in args.budgets:
            KVEviction(policy=policy, budget=budget)  # ValueError naming the bad parameter, before any work
    if any(context < 2 * args.budgets[-1] for context in args.contexts):
        raise ValueError(f"--contexts: each must be at least twice the largest budget ({args.budgets[-1]}), so "
                         "the scored second half of a window is predicted from an evicted cache")

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = lc.from_pretrained(args.model, dtype=dtype, device_map=str(device)).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "versions": {"torch": torch.__version__, "transformers": version("transformers")},
        "command": " ".join(["python", *sys.argv]),
    }
    settings = {key: getattr(args, key) for key in ("model", "rope", "contexts", "budgets", "policies", "depths",
                                                    "passkey_samples", "ppl_samples", "chunk", "seed")}
    windows = {context: heldout_windows(tokenizer, [context], args.ppl_samples)[1][context] for context in args.contexts}

    started = time.time()
    results, skipped = [], []
    for context in args.contexts:
        for policy, budget in configurations(args):
            name = f"{policy}{'' if budget is None else f':{budget}'} at {context}"
            if time.time() - started > 60 * args.max_minutes:
                skipped.append(name)
                continue
            try:
                results.append(evaluate(model, tokenizer, args, context, windows[context], policy, budget))
                r = results[-1]
                print(f"{name:>24}: passkey {r['passkey']:.2f}, ppl {r['perplexity']:.3f} ({r['seconds']} s)",
                      flush=True)
            except Exception as error:  # one failed configuration must not stop the others
                traceback.print_exc()
                skipped.append(f"{name} ({type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''})")
            finally:
                lc.unpatch(model)
            (out / "kv_quality.json").write_text(json.dumps(
                {"settings": settings, "metadata": meta, "results": results, "skipped": skipped}, indent=2) + "\n")
            (out / "kv_quality.md").write_text(to_markdown(args, results, skipped, meta))
    plot(args, results, out)
    print("\n" + to_markdown(args, results, skipped, meta))
    print(f"wrote {out}/kv_quality.json, .md and the plots in {time.time() - started:.0f} s")
    return 0 if not skipped else 1


if __name__ == "__main__":
    sys.exit(main())
