#!/usr/bin/env bash
# Train the project's two reference models in ONE GPU job (about 8 minutes on one H100), then pack them.
#
#   OUT=<folder that comes back> bash recipes/train_reference_models.sh      # from the repository root
#
# Steps: a byte-level BPE tokenizer trained on this machine's Python sources (hf_longctx/eval/corpus.py),
# the target model (~20 M parameters, capped at TARGET_MINUTES), the draft model (~3.5 M, DRAFT_MINUTES),
# both trained at 1024 tokens. They land in model_cards/longctx-target-20m/ and model_cards/longctx-draft-3m/.
# Under $OUT: reference_models.tar.gz.part-aa, -ab, ... (15 MiB each) with its .sha256, job.log (all
# output) and timings.txt (seconds per step). Unpack here with recipes/unpack_reference_models.sh.
# The package need not be installed: the repository root goes on PYTHONPATH.
#
# Knobs (environment variables; the defaults are the GPU job's):
#   TARGET_MINUTES=5.5  DRAFT_MINUTES=1.5   wall-clock cap of each training process
#   EVAL=1   run the model cards' evaluations (hf-longctx eval) before packing; EVAL=0 skips them
#   VOCAB_SIZE=8192  TOKENIZER_BYTES=150000000   tokenizer vocabulary; most text it trains on
#   ROOTS=""   corpus folders, space-separated (default: this Python's standard library and site-packages)
#   PRETRAIN_ARGS=""   extra arguments for both trainings   MIXED_PRECISION=bf16   PYTHON=python (or python3)
# CPU smoke test: MIXED_PRECISION=no ROOTS=<dir> PRETRAIN_ARGS="--max-steps 5 --batch-size 2 --seq-len 256".
set -euo pipefail
: "${OUT:?set OUT to the folder that receives the packed models and the logs}"

TARGET_MINUTES=${TARGET_MINUTES:-5.5}
DRAFT_MINUTES=${DRAFT_MINUTES:-1.5}
VOCAB_SIZE=${VOCAB_SIZE:-8192}
TOKENIZER_BYTES=${TOKENIZER_BYTES:-150000000}
MIXED_PRECISION=${MIXED_PRECISION:-bf16}
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
read -r -a EXTRA <<< "${PRETRAIN_ARGS:-}"
read -r -a ROOT_LIST <<< "${ROOTS:-}"
CORPUS=()
if (( ${#ROOT_LIST[@]} )); then CORPUS=(--roots "${ROOT_LIST[@]}"); fi

export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=true  # set explicitly: the data-loader workers fork after encoding, and never encode

BUILD=build/reference_models
TARGET=model_cards/longctx-target-20m
DRAFT=model_cards/longctx-draft-3m
TAR=$BUILD/reference_models.tar.gz
LOG=$OUT/job.log
TIMES=$OUT/timings.txt
mkdir -p "$OUT" "$BUILD" "$TARGET" "$DRAFT"
: > "$LOG"
: > "$TIMES"

if command -v accelerate > /dev/null; then LAUNCH=(accelerate launch); else LAUNCH=("$PYTHON" -m accelerate.commands.launch); fi
LAUNCH+=(--num_processes 1 --num_machines 1 --mixed_precision "$MIXED_PRECISION" --dynamo_backend no)

# step NAME COMMAND...: run COMMAND with its output appended to the log, and record its wall time.
step() {
    local name=$1 start
    shift
    start=$(date +%s.%N)
    echo "=== $name: $*" | tee -a "$LOG"
    "$@" 2>&1 | tee -a "$LOG"
    awk -v name="$name" -v start="$start" -v end="$(date +%s.%N)" \
        'BEGIN { printf "%-10s %7.1f s\n", name, end - start }' | tee -a "$TIMES"
}

versions() {
    nvidia-smi -L || true
    "$PYTHON" -c 'import sys, torch, transformers, tokenizers, accelerate
print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__,
      "tokenizers", tokenizers.__version__, "accelerate", accelerate.__version__, "cuda", torch.cuda.is_available())'
}

pack() {
    du -sh "$TARGET" "$DRAFT"
    tar -czf "$TAR" -C model_cards "$(basename "$TARGET")" "$(basename "$DRAFT")"
    (cd "$BUILD" && sha256sum "$(basename "$TAR")") > "$OUT/reference_models.tar.gz.sha256"
    split -b 15M "$TAR" "$OUT/reference_models.tar.gz.part-"
    ls -l "$OUT"
    local size
    size=$(stat -c %s "$TAR")
    if (( size > 60 * 1024 * 1024 )); then
        echo "ERROR: $TAR is $size bytes; the device returns at most 64 MiB in 8 files" >&2
        return 1
    fi
}

step versions versions
step tokenizer "$PYTHON" recipes/train_tokenizer.py --output "$BUILD/tokenizer" --vocab-size "$VOCAB_SIZE" \
    --max-bytes "$TOKENIZER_BYTES" "${CORPUS[@]}"
step target "${LAUNCH[@]}" recipes/pretrain.py --model target --tokenizer "$BUILD/tokenizer" --output "$TARGET" \
    --max-minutes "$TARGET_MINUTES" --token-cache "$BUILD/tokens.pt" "${CORPUS[@]}" "${EXTRA[@]}"
step draft "${LAUNCH[@]}" recipes/pretrain.py --model draft --tokenizer "$BUILD/tokenizer" --output "$DRAFT" \
    --max-minutes "$DRAFT_MINUTES" --token-cache "$BUILD/tokens.pt" "${CORPUS[@]}" "${EXTRA[@]}"
# evaluate: the baseline numbers of the two model cards, each from an `hf-longctx eval` command whose exact
# form lands in the result JSON (paths relative to the repository root, as the cards quote them).
evaluate() {
    local eval=("$PYTHON" -m hf_longctx.cli eval)
    "${eval[@]}" "$TARGET" --output "$TARGET/eval" --task ppl --multiples 1,2,4,8,16 --samples 8
    "${eval[@]}" "$TARGET" --output "$TARGET/eval" --task passkey --multiples 1,2,4,8 --samples 10
    "${eval[@]}" "$TARGET" --output "$TARGET/eval" --task needle --multiples 1,2,4,8
    "${eval[@]}" "$DRAFT" --output "$DRAFT/eval" --task ppl --multiples 1,2,4 --samples 8
    "${eval[@]}" "$DRAFT" --output "$DRAFT/eval" --task agreement --target "$TARGET" --lengths 1024 --samples 16
}
if [[ "${EVAL:-1}" == 1 ]]; then step eval evaluate || echo "WARNING: an evaluation failed; packing what exists" | tee -a "$LOG"; fi
step pack pack
