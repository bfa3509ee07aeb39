#!/usr/bin/env bash
# GPU job for the KV cache (issue 5): CUDA cache tests, the eviction quality table, then the decode benchmark.
# Run from the repository root on the GPU machine:  bash benchmarks/run_gpu_kv.sh OUTDIR
# Writes under OUTDIR: env.txt, pytest_cuda.log, kv_quality.log + kv_quality/ (json, md, png),
# kv_cache.log + kv_cache/ (kv_cache.csv, kv_cache.md). A part that fails or times out does not stop the next.
#
# Wall time under 8 minutes:
#   1) side by side (neither is a timing): pytest -m cuda on the LongCtxCache tests of tests/test_patch_cuda.py,
#      and benchmarks/kv_quality.py on the 20M reference target (<= 150 s);
#   2) alone on the GPU: benchmarks/kv_cache.py on the Llama-3-8B-shaped model (<= 330 s; it writes its table
#      after every row and starts no row after 4.2 minutes, so a timeout still leaves the rows measured so far).
set -uo pipefail

OUT="${1:?usage: bash benchmarks/run_gpu_kv.sh OUTDIR}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET
TMP_RC="$(mktemp -d)"

{
  date
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'cuda', torch.version.cuda)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

t0=$(date +%s)
# SIGINT on timeout so that pytest prints its summary and the benchmarks keep what they wrote
( timeout -s INT -k 15 150 "$PY" -m pytest tests/test_patch_cuda.py -m cuda -k "long_ctx_cache or eviction" \
    -x -q -rA -p no:cacheprovider > "$OUT/pytest_cuda.log" 2>&1; echo $? > "$TMP_RC/tests" ) &
( timeout -s INT -k 15 150 "$PY" benchmarks/kv_quality.py --out "$OUT/kv_quality" --max-minutes 2.0 \
    > "$OUT/kv_quality.log" 2>&1; echo $? > "$TMP_RC/quality" ) &
wait
rc_tests=$(cat "$TMP_RC/tests" 2>/dev/null || echo 99)
rc_quality=$(cat "$TMP_RC/quality" 2>/dev/null || echo 99)
echo "pytest -m cuda: rc=$rc_tests; kv_quality: rc=$rc_quality ($(( $(date +%s) - t0 )) s)"
grep -E "passed|failed|error|Error" "$OUT/pytest_cuda.log" | tail -20
tail -40 "$OUT/kv_quality.log"

t1=$(date +%s)
timeout -s INT -k 15 330 "$PY" benchmarks/kv_cache.py --out "$OUT/kv_cache" --max-minutes 4.2 \
    > "$OUT/kv_cache.log" 2>&1
rc_bench=$?
echo "kv_cache: rc=$rc_bench ($(( $(date +%s) - t1 )) s)"
if [ -f "$OUT/kv_cache/kv_cache.md" ]; then cat "$OUT/kv_cache/kv_cache.md"; else tail -60 "$OUT/kv_cache.log"; fi
grep -E "Error|error" "$OUT/kv_cache.log" | tail -20
rm -rf "$TMP_RC"
echo "total $(( $(date +%s) - t0 )) s; results in $OUT"
exit $(( rc_tests != 0 || rc_quality != 0 || rc_bench != 0 ))
