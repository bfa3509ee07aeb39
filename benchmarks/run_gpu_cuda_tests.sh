#!/usr/bin/env bash
# Every `@pytest.mark.cuda` test, one test file at a time under its own time cap, for a device call whose length is
# bounded (`make gpu-test` runs them in one process with no cap). Run from the repository root on a GPU machine:
#
#   bash benchmarks/run_gpu_cuda_tests.sh OUTDIR [CAP_SECONDS] [TEST_FILE ...]
#
# Without TEST_FILEs: every tests/test_*.py that has a cuda test. Writes OUTDIR/<file>.log per file and
# OUTDIR/summary.txt (pytest's last line and exit code per file); a file that fails or runs out of time does not
# stop the next. Set HF_LONGCTX_AUTOTUNE=0 to compile only the first kernel config of each shape (no tuning runs).
set -uo pipefail
OUT="${1:?usage: bash benchmarks/run_gpu_cuda_tests.sh OUTDIR [CAP_SECONDS] [TEST_FILE ...]}"
CAP="${2:-240}"
shift $(( $# >= 2 ? 2 : 1 ))
PY="${PYTHON:-python}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
files=("$@")
if [ ${#files[@]} -eq 0 ]; then
    mapfile -t files < <(grep -lE "pytest\.mark\.cuda|^pytestmark = pytest\.mark\.cuda" tests/test_*.py)
fi
: > "$OUT/summary.txt"
for file in "${files[@]}"; do
    name=$(basename "$file" .py)
    start=$(date +%s)
    timeout -s INT -k 15 "$CAP" "$PY" -m pytest "$file" -m cuda -q -rfE -p no:cacheprovider > "$OUT/$name.log" 2>&1
    rc=$?
    printf '%-32s rc=%-3s %4ss  %s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$(tail -n 1 "$OUT/$name.log")" \
        | tee -a "$OUT/summary.txt"
done
