#!/usr/bin/env bash
# Device calls: record opt-mini's activations and train a complete predictor folder (MLP
# and attention, every layer) on the H100, kept in /tmp/pred on the warm machine and
# copied to $OUT/predictors (weights included) for the sparse path.
#   STAGE=mlp        record 400k rows (resumes) and fit the MLP predictors
#   STAGE=attention  fit the attention predictors (--resume reloads the finished MLP run)
# Expects dist/dejavu-train.xz and dist/corpus-head.txt.xz (see train.sh).
set -uo pipefail
source bench/device/setup.sh
exec > >(tee -a "$OUT/train-full.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
rec=/tmp/rec
pred=/tmp/pred
case "${STAGE:-mlp}" in
mlp)
    time timeout "${RECORD_LIMIT:-220}" dejavu-train record --backend cuda --dtype f32 \
        --text dist/corpus-head.txt.xz --out "$rec" --rows "${ROWS:-400000}" --valid-rows 20000 \
        --length-bucket 2048
    cp "$rec/recording.json" "$OUT/"
    time timeout "${FIT_LIMIT:-340}" dejavu-train fit --backend cuda --recording "$rec" --out "$pred" \
        --ranks "${RANKS:-128}" --kinds mlp --resume ${FIT_ARGS:-}
    ;;
attention)
    time timeout "${FIT_LIMIT:-560}" dejavu-train fit --backend cuda --recording "$rec" --out "$pred" \
        --ranks "${RANKS:-128}" --kinds mlp,attention --resume ${FIT_ARGS:-}
    ;;
esac
mkdir -p "$OUT/predictors"
cp "$pred"/predictors.json "$pred"/predictors.safetensors "$pred"/fit-report.* "$OUT/predictors/" 2>/dev/null
for f in "$pred"/training/*/result.json; do d=$(dirname "$f"); cp "$f" "$OUT/result-$(basename "$d").json"; done
tar czf "$OUT/autotune.tgz" target/autotune 2>/dev/null
ls -la "$OUT" "$OUT/predictors"
