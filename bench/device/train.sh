#!/usr/bin/env bash
# Device call: record opt-mini's activations and train its predictors on the H100
# (`--backend cuda`: CubeBackend without fusion, Autodiff over it for training), timing
# each step. Expects dist/dejavu-train.xz and dist/corpus-head.txt.xz (the first 1643
# documents of the shared corpus-train.txt.xz). Writes under $OUT: logs, recording.json,
# the predictor folder's predictors.json, fit-report.json and fit-report.png.
set -uo pipefail
source bench/device/setup.sh
exec > >(tee -a "$OUT/train.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
rec=/tmp/rec
pred=$OUT/predictors
time timeout "${RECORD_LIMIT:-240}" dejavu-train record --backend cuda --dtype "${DTYPE:-f32}" \
    --text dist/corpus-head.txt.xz --out "$rec" --rows "${ROWS:-400000}" --valid-rows "${VALID_ROWS:-20000}" \
    --length-bucket "${LENGTH_BUCKET:-2048}"
cp "$rec/recording.json" "$OUT/" 2>/dev/null
time timeout "${FIT_LIMIT:-300}" dejavu-train fit --backend cuda --recording "$rec" --out "$pred" \
    --ranks "${RANKS:-128}" --epochs "${EPOCHS:-20}" --workers "${WORKERS:-0}" ${FIT_ARGS:-}
for f in "$pred"/training/*/result.json; do d=$(dirname "$f"); cp "$f" "$OUT/result-$(basename "$d").json"; done
rm -rf "$pred/training" "$pred/predictors.safetensors"
# CubeCL's autotune results (kept in target/autotune of the working directory): carry them
# back so that a later call on a fresh machine need not tune again.
tar czf "$OUT/autotune.tgz" target/autotune 2>/dev/null
ls -la "$OUT" "$pred"
if [ -n "${FUSED_PROBE:-}" ]; then
    # Does training run on Burn's fusion backend (Autodiff<Fusion<CubeBackend>>)?
    time timeout 90 dejavu-train fit --backend cuda-fused --recording "$rec" --out /tmp/fused \
        --ranks 128 --epochs 2 --layers 6 --workers 4; echo "fused probe exit $?"
fi
