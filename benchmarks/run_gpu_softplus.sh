#!/usr/bin/env bash
# Issue 8 in ONE device call (under 11 minutes on an H100: 300 + 150 + 210 s caps; split it over two calls if needed): cuda tests, benchmark, extrapolation recipe.
#   bash benchmarks/run_gpu_softplus.sh OUTDIR
# Each part logs to OUTDIR/<part>.log; a failing part does not stop the next.
set -u
OUT=${1:?usage: run_gpu_softplus.sh OUTDIR}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python || command -v python3)}
part() { local name=$1 limit=$2; shift 2; echo "=== $name (limit ${limit}s)"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1;
         echo "$name rc=$?" | tee -a "$OUT/status.txt"; tail -n 25 "$OUT/$name.log"; }
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
part tests 300 "$PY" -m pytest tests/test_softplus_kernel.py -m cuda -q -s
part bench 150 "$PY" benchmarks/softplus_attention.py --out "$OUT/bench"
STEPS=${STEPS:-500} MAX_MINUTES=${MAX_MINUTES:-1.0} part extrapolation 210 \
    bash recipes/softplus_extrapolation.sh "$OUT/models" "$OUT/softplus_extrapolation"
rm -f "$OUT/models/tokens.pt" "$OUT"/models/{softmax,lssa}/model.safetensors  # keep the LSSAR folder only
