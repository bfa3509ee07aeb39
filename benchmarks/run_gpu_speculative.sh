#!/usr/bin/env bash
# GPU job for speculative decoding (issue 7): CUDA tests, then the benchmark.
# Run from the repository root on the GPU machine:  bash benchmarks/run_gpu_speculative.sh OUTDIR
# Writes under OUTDIR: env.txt, pytest_cuda.log, bench_pair.log, bench_rest.log, speculative.csv/.md,
# profile.log, speculative_profile.txt. At most ~9 minutes (time limits 90 + 200 + 150 + 90 s): each step has its
# own timeout and a failing step does not stop the next. The compiled-layers experiment runs on its own:
# benchmarks/speculative_compiled.py (~2 minutes at 32K batch 32).
set -uo pipefail

OUT="${1:-${OUT:-out/gpu-speculative}}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET
t0=$(date +%s)

{
  date
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'cuda', torch.version.cuda)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. CUDA tests of speculative decoding (greedy identity on the GPU, the reference pair in fp32; graphed draft
#    steps against eager ones and plain generate).
timeout -s INT -k 15 90 "$PY" -m pytest tests/test_speculative.py -m cuda -x -q -rA -p no:cacheprovider \
  > "$OUT/pytest_cuda.log" 2>&1
rc_test=$?
echo "pytest -m cuda: rc=$rc_test ($(( $(date +%s) - t0 )) s)"; tail -5 "$OUT/pytest_cuda.log"

# 2. Reference pair: self-speculation vs plain decoding, same cache, CUDA graphs on both sides (8K/32K, batch 1/32,
#    T 0/0.8).
t1=$(date +%s)
timeout -s INT -k 15 200 "$PY" benchmarks/speculative.py --out "$OUT" --quick --parts pair > "$OUT/bench_pair.log" 2>&1
rc_pair=$?
echo "bench pair: rc=$rc_pair ($(( $(date +%s) - t1 )) s)"; tail -4 "$OUT/bench_pair.log"

# 3. Fixed lengths vs adaptive, draft model vs HF assisted (32K batch 1), cost on a random 8B-shaped target.
t2=$(date +%s)
timeout -s INT -k 15 150 "$PY" benchmarks/speculative.py --out "$OUT" --quick --parts lengths,draft,cost \
  > "$OUT/bench_rest.log" 2>&1
rc_rest=$?
echo "bench lengths,draft,cost: rc=$rc_rest ($(( $(date +%s) - t2 )) s)"

# 4. Where a round's time goes at 32K batch 32 (phases, graph replays, profiler tables).
t3=$(date +%s)
timeout -s INT -k 10 90 "$PY" benchmarks/speculative_profile.py --out "$OUT" > "$OUT/profile.log" 2>&1
echo "profile: rc=$? ($(( $(date +%s) - t3 )) s)"; head -16 "$OUT/speculative_profile.txt" 2>/dev/null
echo "--- table ---"; cat "$OUT/speculative.md" 2>/dev/null
grep -E "Error|error" "$OUT"/bench_*.log | tail -20
echo "total $(( $(date +%s) - t0 )) s; results in $OUT"
exit $(( rc_test != 0 || rc_pair != 0 || rc_rest != 0 ))
