#!/usr/bin/env bash
# GPU job for dynamic block-sparse prefill (issue 9): CUDA tests, speed benchmark, quality benchmark.
# Run from the repository root on the GPU machine:  bash benchmarks/run_gpu_sparse.sh OUTDIR
# Writes under OUTDIR: env.txt, pytest_cuda.log, bench.log, sparse_attention.csv/.md (rewritten after every row),
# child-<core|flex>-<S>.log (one process per length and group: a device assert in FlexAttention cannot stop the
# rest), quality.log and sparse_quality/ (table + JSON), variants.log and variants/ (sparse_variants.csv/.md). Each
# part has its own time limit and a failing part does not stop the next. PARTS (default "tests speed quality
# variants") picks parts: all four together exceed one 10-minute device call (limits 150 + 390 + 40 + 200 s): split
# them, e.g. PARTS="tests variants" then PARTS="speed quality". "variants" times the forward schedules of
# block_sparse.FWD_VARIANTS at 128K with our dense kernel (sparse_variants.py --dense).
set -uo pipefail
OUT="${1:-${OUT:-out/gpu-sparse}}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
PARTS=" ${PARTS:-tests speed quality variants} "
want() { [[ "$PARTS" == *" $1 "* ]]; }
t0=$(date +%s)
{
  date
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if want tests; then
  timeout -s INT -k 10 "${TEST_S:-150}" "$PY" -m pytest tests/test_sparse_kernel.py tests/test_sparse_patch.py -m cuda -q \
    -rA -s -p no:cacheprovider > "$OUT/pytest_cuda.log" 2>&1
  echo "pytest -m cuda: rc=$? ($(( $(date +%s) - t0 )) s)"; grep -E "passed|failed|error|err" "$OUT/pytest_cuda.log" | tail -20
fi
if want speed; then
  t1=$(date +%s)
  timeout -s INT -k 10 390 "$PY" benchmarks/sparse_attention.py --out "$OUT" --deadline-s 370 > "$OUT/bench.log" 2>&1
  echo "speed benchmark: rc=$? ($(( $(date +%s) - t1 )) s)"; tail -40 "$OUT/bench.log"
fi
if want quality; then
  t2=$(date +%s)
  timeout -s INT -k 5 40 "$PY" benchmarks/sparse_quality.py --out "$OUT/sparse_quality" > "$OUT/quality.log" 2>&1
  echo "quality benchmark: rc=$? ($(( $(date +%s) - t2 )) s)"; tail -25 "$OUT/quality.log"
fi
if want variants; then  # the forward schedules at 128K (and our dense kernel, for the per-block ratio)
  t3=$(date +%s)
  timeout -s INT -k 10 "${VARIANTS_S:-200}" "$PY" benchmarks/sparse_variants.py "$OUT/variants" --seqs 131072 \
    --budget-s $(( ${VARIANTS_S:-200} - 45 )) --dense > "$OUT/variants.log" 2>&1
  echo "variants: rc=$? ($(( $(date +%s) - t3 )) s)"; cat "$OUT/variants/sparse_variants.md"
fi
echo "total $(( $(date +%s) - t0 )) s; results in $OUT"
