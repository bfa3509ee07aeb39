#!/usr/bin/env bash
# The softplus-attention paper's extrapolation comparison at small scale: the target architecture
# (recipes/pretrain.py --model target, ~20 M parameters) trained from scratch at 1024 tokens three times --
# softmax, LSSA ("softplus:reweight=false"), LSSAR ("softplus", p = 15) -- with the SAME token budget
# (STEPS x batch 32 x 1024 tokens), then validation loss (mean token NLL = log perplexity) at 1x..16x.
#
#   bash recipes/softplus_extrapolation.sh MODEL_OUT [RESULTS_DIR]      # from the repository root, on a GPU
#
# MODEL_OUT receives the three trained models (lssar/ is the reference model folder to commit with its card);
# RESULTS_DIR (default benchmarks/results/softplus_extrapolation) receives table.md, results.json, plot.png.
# Knobs: STEPS=1000 (32.8 M tokens each), MAX_MINUTES=2.5 (safety cap per run, data preparation included: the
# first run tokenizes the corpus, ~30 s on the H100, so a tight cap cuts softmax short -- a run it stops trains
# fewer steps, which the table's steps column shows), SAMPLES=4 validation windows per length, TOKENIZER
# (default model_cards/longctx-target-20m).
# SMOKE=1: a CPU check of the plumbing (plain python, 64-token blocks, batch 2, 2 steps, 1x..2x, ~3 minutes on
# 2 cores); its numbers mean nothing.
set -uo pipefail
MODEL_OUT=${1:?usage: softplus_extrapolation.sh MODEL_OUT [RESULTS_DIR]}
RESULTS=${2:-benchmarks/results/softplus_extrapolation}
STEPS=${STEPS:-1000}
MAX_MINUTES=${MAX_MINUTES:-2.5}
SAMPLES=${SAMPLES:-4}
TOKENIZER=${TOKENIZER:-model_cards/longctx-target-20m}
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=true
LAUNCH=("$PYTHON" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision bf16
        --dynamo_backend no)
SEQ=1024 BATCH=32 MULTIPLES=1,2,4,8,16 DATA=()
if [[ "${SMOKE:-0}" == 1 ]]; then
    LAUNCH=("$PYTHON") SEQ=64 BATCH=2 MULTIPLES=1,2 STEPS=2 SAMPLES=1
    DATA=(--max-train-bytes 200000 --eval-blocks 2 --num-workers 0 --logging-steps 1)
fi
mkdir -p "$MODEL_OUT" "$RESULTS"
COMMAND="SMOKE=${SMOKE:-0} STEPS=$STEPS MAX_MINUTES=$MAX_MINUTES SAMPLES=$SAMPLES bash recipes/softplus_extrapolation.sh \
$MODEL_OUT $RESULTS"

for spec in "softmax:softmax" "lssa:softplus:reweight=false" "lssar:softplus"; do
    name=${spec%%:*}
    attention=${spec#*:}
    echo "=== train $name (--attention $attention)"
    "${LAUNCH[@]}" recipes/pretrain.py --model target --tokenizer "$TOKENIZER" --output "$MODEL_OUT/$name" \
        --attention "$attention" --seq-len "$SEQ" --batch-size "$BATCH" --max-steps "$STEPS" \
        --max-minutes "$MAX_MINUTES" --eval-steps 0 --token-cache "$MODEL_OUT/tokens.pt" "${DATA[@]}" \
        || echo "!!! training $name failed"
    echo "=== eval $name"
    "$PYTHON" -m hf_longctx.cli eval "$MODEL_OUT/$name" --task ppl --multiples "$MULTIPLES" --samples "$SAMPLES" \
        --output "$MODEL_OUT/$name/eval" || echo "!!! eval $name failed"
done

"$PYTHON" - "$MODEL_OUT" "$RESULTS" "$COMMAND" "$SEQ" <<'PY'
import json, os, sys
import torch, transformers
out, results, command, seq = *sys.argv[1:4], int(sys.argv[4])
rows = {}
for name in ("softmax", "lssa", "lssar"):
    entry = {}
    try:
        entry = json.load(open(os.path.join(out, name, "eval", "ppl.json")))
    except Exception as exc:  # a failed run is reported, not hidden
        entry = {"error": repr(exc)}
    try:
        curve = json.load(open(os.path.join(out, name, "loss_curve.json")))
        entry["training"] = {k: v for k, v in curve.items() if k != "log_history"}
    except Exception as exc:
        entry["training"] = {"error": repr(exc)}
    rows[name] = entry
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
lengths = next((r["lengths"] for r in rows.values() if "lengths" in r), [])
lines = [f"# Softplus attention extrapolation (target model, trained at {seq} tokens, same token budget)", "",
         f"Device: {device}; torch {torch.__version__}; transformers {transformers.__version__}.",
         f"Command: `{command}`", "", "Validation loss (mean token NLL) by evaluation length:", "",
         "| attention | " + " | ".join(f"{l} ({l // seq}x)" for l in lengths) + " | steps | tokens |",
         "|---|" + "---|" * (len(lengths) + 2)]
for name, r in rows.items():
    nll = r.get("nll", [])
    t = r.get("training", {})
    lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in nll) + (" | " * (len(lengths) - len(nll)))
                 + f" | {t.get('steps', '?')} | {t.get('tokens_seen', '?')} |")
lines += ["", "Paper (GPT-2 124M, trained at 1024, loss at 8K): softmax 6.28, LSSA 5.94, LSSAR (p=15) 3.32."]
open(os.path.join(results, "table.md"), "w").write("\n".join(lines) + "\n")
json.dump({"command": command, "device": device, "runs": rows}, open(os.path.join(results, "results.json"), "w"),
          indent=1)
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for name, r in rows.items():
        if "nll" in r:
            plt.plot(r["lengths"], r["nll"], marker="o", label=name)
    plt.xscale("log", base=2); plt.xlabel("evaluation length (tokens)"); plt.ylabel("validation loss")
    plt.legend(); plt.title(f"trained at {seq} tokens"); plt.savefig(os.path.join(results, "plot.png"), dpi=120)
except Exception as exc:
    print("plot failed:", exc)
print("\n".join(lines))
PY
