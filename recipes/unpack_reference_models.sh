#!/usr/bin/env bash
# Reassemble the reference models that recipes/train_reference_models.sh packed into parts.
#
#   bash recipes/unpack_reference_models.sh <folder holding reference_models.tar.gz.part-*>   # from the repository root
#
# Checks the parts against reference_models.tar.gz.sha256, extracts model_cards/longctx-target-20m/ and
# model_cards/longctx-draft-3m/, and renders loss_curve.png from loss_curve.json where the GPU machine
# could not (no matplotlib there).
set -euo pipefail
SRC=${1:?usage: bash recipes/unpack_reference_models.sh <folder holding reference_models.tar.gz.part-*>}
PYTHON=${PYTHON:-$(command -v python || command -v python3)}

parts=("$SRC"/reference_models.tar.gz.part-*)
if [[ ! -e ${parts[0]} ]]; then
    echo "no reference_models.tar.gz.part-* in $SRC" >&2
    exit 1
fi
expected=$(cut -d ' ' -f 1 "$SRC/reference_models.tar.gz.sha256")
actual=$(cat "${parts[@]}" | sha256sum | cut -d ' ' -f 1)
if [[ $expected != "$actual" ]]; then
    echo "checksum mismatch: parts give $actual, the job wrote $expected" >&2
    exit 1
fi
mkdir -p model_cards
cat "${parts[@]}" | tar -xzf - -C model_cards
for folder in model_cards/longctx-target-20m model_cards/longctx-draft-3m; do
    if [[ ! -f $folder/loss_curve.png ]]; then
        PYTHONPATH="$PWD/recipes:$PWD" "$PYTHON" -c 'import sys, pretrain; pretrain.plot_loss_curve(sys.argv[1])' "$folder"
    fi
    du -sh "$folder"
done
