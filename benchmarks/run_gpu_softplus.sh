#!/usr/bin/env bash
# Issue 8 on the GPU: cuda tests, benchmark (both backward schedules), extrapolation recipe.
#   bash benchmarks/run_gpu_softplus.sh OUTDIR
# PARTS (default "tests bench extrapolation") picks parts; their limits (240 + 150 + 330 s) exceed one 10-minute
# device call together: split them, e.g. PARTS="tests bench" then PARTS="extrapolation".
# Each part logs to OUTDIR/<part>.log; a failing part does not stop the next.
set -u
OUT=${1:?usage: run_gpu_softplus.sh OUTDIR}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-$(command -v python || command -v python3)}
PARTS=" ${PARTS:-tests bench extrapolation} "
want() { [[ "$PARTS" == *" $1 "* ]]; }
part() { local name=$1 limit=$2; shift 2; echo "=== $name (limit ${limit}s)"; timeout -s INT -k 10 "$limit" "$@" \
         > "$OUT/$name.log" 2>&1; echo "$name rc=$?" | tee -a "$OUT/status.txt"; tail -n 25 "$OUT/$name.log"; }
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
want tests && part tests 240 "$PY" -m pytest tests/test_softplus_kernel.py -m cuda -q -s -p no:cacheprovider
# first kernel configs only (no autotuning inside the time limit); 8K and 32K, both backward schedules
want bench && HF_LONGCTX_AUTOTUNE=0 part bench 150 "$PY" benchmarks/softplus_attention.py --out "$OUT/bench" \
    --seqs 8192,32768 --bwd-variants split,fused
if want extrapolation; then
    STEPS=${STEPS:-500} MAX_MINUTES=${MAX_MINUTES:-2.0} part extrapolation 330 \
        bash recipes/softplus_extrapolation.sh "$OUT/models" "$OUT/softplus_extrapolation"
    rm -f "$OUT/models/tokens.pt" "$OUT"/models/{softmax,lssa}/model.safetensors  # keep the LSSAR folder only
fi
