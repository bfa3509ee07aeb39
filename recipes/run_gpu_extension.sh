#!/usr/bin/env bash
# GPU job of issue 10 (one H100, about 7.5 minutes): extend the reference target from 1024 to 8192 tokens,
# evaluate it, run the QLoRA path, then benchmark training speed. Run from the repository root:
#
#   bash recipes/run_gpu_extension.sh OUTDIR          # carry .whl (bitsandbytes, peft wheels) with it
#
# Parts (each with its own timeout; a failed part is logged and the next one runs):
#   1. extend   recipes/extend_context.py through `accelerate launch` (recipes/single_gpu.yaml): linear RoPE x8,
#               $TRAIN_ATTENTION in training (default `sink:8192,4`: our Triton kernel, forward and backward, with a
#               window covering the 8192 tokens, i.e. dense causal; set TRAIN_ATTENTION=s2_sink for SinkLoRA's
#               pattern), full fine-tuning, 15% passkey blocks, a 2.75-minute wall-clock cap (data preparation
#               included). Dense, because passkey retrieval at 8K is learnt from keys 8K back, which s2 groups of
#               2048 tokens never show; s2_sink's speed is what part 4 measures.
#   2. eval     `hf-longctx eval` perplexity and passkey at 1024..8192 tokens on the extended model; the base
#               model's results (model_cards/longctx-target-20m/eval) are copied beside them as "before";
#               the card is re-rendered with both (`hf-longctx card`).
#   3. qlora    recipes/extend_context.py --qlora, 50 steps (NF4 base + LongLoRA adapter), peak memory logged.
#   (beside 2 and 3: pytest -m cuda of tests/test_convergence.py and tests/test_training.py, bf16 Triton path)
#   4. speed    benchmarks/training_speed.py: tokens/s and peak memory of s2_sink vs SDPA-cuDNN training steps.
# PARTS (default "extend eval tests qlora speed") picks the parts to run, so a device call can put other work between them.
# Under OUTDIR: job.log (all output), timings.txt, summary.md (the tables), and results.tar.gz.part-* (15 MiB
# each, with results.tar.gz.sha256) holding longctx-target-20m-8k/ (the model folder for model_cards/),
# qlora/ (its card and loss curve; weights left out) and speed/ (the benchmark's CSV and markdown). Unpack with
#   cat OUTDIR/results.tar.gz.part-* | tar -xz -C <dir>
set -uo pipefail
OUT="${1:?usage: bash recipes/run_gpu_extension.sh OUTDIR}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PARTS=" ${PARTS:-extend eval tests qlora speed} "
want() { [[ "$PARTS" == *" $1 "* ]]; }
WORK=build/issue10  # the results before packing (OUTDIR returns at most 8 files); relative, so the commands that
want extend && rm -rf "$WORK"  # the cards and result files quote carry no temporary paths
mkdir -p "$WORK"
# HF_LONGCTX_AUTOTUNE=0: the first kernel config of each shape, no autotuning runs inside the time budget
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true HF_LONGCTX_AUTOTUNE=0
unset TRITON_INTERPRET
LOG="$OUT/job.log"
TIMES="$OUT/timings.txt"
: > "$LOG"
: > "$TIMES"

# step NAME SECONDS COMMAND...: COMMAND under a timeout (SECONDS "-": none, for shell functions that time
# their own commands), output appended to the log, wall time recorded.
step() {
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s.%N)
    echo "=== $name (timeout ${limit}s): $*" | tee -a "$LOG"
    if [[ "$limit" == - ]]; then "$@" 2>&1 | tee -a "$LOG"; else timeout -s INT -k 20 "$limit" "$@" 2>&1 | tee -a "$LOG"; fi
    rc=${PIPESTATUS[0]}
    awk -v n="$name" -v s="$start" -v e="$(date +%s.%N)" -v rc="$rc" \
        'BEGIN { printf "%-8s %7.1f s  rc=%s\n", n, e - s, rc }' | tee -a "$TIMES"
    return "$rc"
}

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        2>&1 | tee -a "$LOG"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD:$PYTHONPATH"
{
    date
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
    "$PY" -c "import torch, triton, transformers, accelerate, peft; print('torch', torch.__version__, 'triton', \
triton.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', \
peft.__version__)"
    "$PY" -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" || true
} 2>&1 | tee -a "$LOG"

BASE=model_cards/longctx-target-20m
MODEL="$WORK/longctx-target-20m-8k"
LAUNCH=("$PY" -m accelerate.commands.launch --config_file recipes/single_gpu.yaml)
SEQ=8192 LENGTHS=1024,2048,4096,8192 PPL_SAMPLES=8 PASSKEY_SAMPLES=10 STEPS=3000 QLORA_STEPS=50 BYTES=60000000
SPEED=()
if [[ "${SMOKE:-0}" == 1 ]]; then  # CPU check of this script's plumbing: SMOKE=1 bash recipes/run_gpu_extension.sh DIR
    LAUNCH=("$PY") SEQ=256 LENGTHS=256,512 PPL_SAMPLES=1 PASSKEY_SAMPLES=1 STEPS=2 QLORA_STEPS=2 BYTES=300000
    SPEED=(--lengths 64 --models target-20m --steps 1)
fi
EXTEND=(recipes/extend_context.py --model "$BASE" --output "$MODEL" --seq-len "$SEQ" --rope linear:8
        --attention "${TRAIN_ATTENTION:-sink:8192,4}" --full-finetune --no-gradient-checkpointing --batch-size 8 --grad-accum 1 --lr 3e-4
        --warmup-steps 30 --max-steps "$STEPS" --max-minutes 2.75 --passkey-fraction 0.15 --max-train-bytes "$BYTES"
        --logging-steps 10 --token-cache "$WORK/tokens.pt")
if want extend; then step extend 200 "${LAUNCH[@]}" "${EXTEND[@]}"; fi

evaluate() {
    local eval=(timeout -s INT -k 10 90 "$PY" -m hf_longctx.cli eval "$MODEL" --output "$MODEL/eval" --lengths "$LENGTHS")
    "${eval[@]}" --task ppl --samples "$PPL_SAMPLES" && "${eval[@]}" --task passkey --samples "$PASSKEY_SAMPLES" \
        || return 1
    mkdir -p "$MODEL/eval/before" && cp "$BASE"/eval/ppl.* "$BASE"/eval/passkey.* "$MODEL/eval/before/"
    local description
    description=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['description'])" \
        "$MODEL/loss_curve.json")
    description+=" Trained with: PYTHONPATH=. HF_LONGCTX_AUTOTUNE=0 accelerate launch --config_file "
    description+="recipes/single_gpu.yaml ${EXTEND[*]} (in recipes/run_gpu_extension.sh). The "
    description+="'before' sections are the base model's own results (stock RoPE, dense attention)."
    "$PY" -m hf_longctx.cli card "$MODEL" --eval-dir "$MODEL/eval" --eval-dir "$MODEL/eval/before" \
        --base-model longctx-target-20m --description "$description"
}
# The CUDA convergence tests (bf16, Triton) run beside the evaluation and QLoRA (small GPU work), before timing.
TESTS_PID=
if want tests; then
    ( timeout -s INT -k 10 150 "$PY" -m pytest tests/test_convergence.py tests/test_training.py -m cuda -q -rA \
        -p no:cacheprovider > "$WORK/pytest_cuda.log" 2>&1; echo "pytest -m cuda rc=$?" >> "$WORK/pytest_cuda.log" ) &
    TESTS_PID=$!
fi
if want eval && [[ -f "$MODEL/config.json" ]]; then step eval - evaluate; fi

want qlora && step qlora 90 "${LAUNCH[@]}" recipes/extend_context.py --qlora --model "$BASE" --output "$WORK/qlora" \
    --seq-len "$SEQ" --rope linear:8 --attention s2_sink --max-steps "$QLORA_STEPS" --batch-size 1 --grad-accum 1 \
    --max-train-bytes "$BYTES" --logging-steps 10 --token-cache "$WORK/tokens-qlora.pt"
rm -rf "$WORK/qlora/adapter" "$WORK/qlora"/*.safetensors 2>/dev/null  # the card, loss curve and memory are the result

if [[ -n "$TESTS_PID" ]]; then wait "$TESTS_PID"; tail -n 15 "$WORK/pytest_cuda.log" | tee -a "$LOG"; fi
want speed && step speed 140 "$PY" benchmarks/training_speed.py "$WORK/speed" --budget-s "${SPEED_BUDGET_S:-100}" "${SPEED[@]}"

summary() {
    echo "# issue 10 GPU run"
    cat "$TIMES"
    echo; echo "## CUDA tests"; tail -n 15 "$WORK/pytest_cuda.log"
    for f in "$MODEL/eval/ppl.md" "$MODEL/eval/passkey.md" "$WORK/speed/training_speed.md"; do
        [[ -f "$f" ]] && { echo; echo "## $f"; cat "$f"; }
    done
    for run in "$MODEL" "$WORK/qlora"; do
        [[ -f "$run/loss_curve.json" ]] && "$PY" -c "import json, sys
r = json.load(open(sys.argv[1])); r.pop('log_history'); print(); print(json.dumps(r, indent=1))" "$run/loss_curve.json"
    done
}
summary > "$OUT/summary.md" 2>&1
cat "$OUT/summary.md"
rm -f "$WORK"/tokens*.pt
PACK="$(mktemp -d)"
tar -czf "$PACK/results.tar.gz" -C "$WORK" . 2>>"$LOG"
(cd "$PACK" && sha256sum results.tar.gz) > "$OUT/results.tar.gz.sha256"
split -b 15M "$PACK/results.tar.gz" "$OUT/results.tar.gz.part-"
ls -l "$OUT" | tee -a "$LOG"
