#!/usr/bin/env bash
# Device call: MLP predictors that read their own layer's input (lookahead 0), trained and
# scored in one call. Records opt-mini's 400k + 20k rows with --lookahead 0, fits every
# sparse layer's MLP predictor (layers 1-11; layer 0 stays dense as under lookahead 1) at
# RANK (default 256), then runs the quality sweep with that folder: dense, its calibrated
# point (recall 0.99 per layer) and fixed MLP densities, attention dense.
# The tree must stay under 64 MiB: the model's weights travel xz-compressed as
# dist/opt-mini-model.safetensors.xz (unpacked here when assets/opt-mini lacks them), with
# dist/dejavu-train.xz, dist/dejavu-bench.xz, dist/corpus-head.txt.xz and
# dist/shared.tar.xz (see sparse.sh). Writes under $OUT: lookahead0-quality.log,
# recording.json, predictors.json, fit-report.json, quality.json, autotune.tgz.
set -uo pipefail
source bench/device/setup.sh
exec > >(tee -a "$OUT/lookahead0-quality.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
cat dist/commit
if [ ! -f assets/opt-mini/model.safetensors ]; then
    xz -dc dist/opt-mini-model.safetensors.xz > assets/opt-mini/model.safetensors
fi
mkdir -p /tmp/shared && tar xJf dist/shared.tar.xz -C /tmp/shared && export DEJAVU_ASSETS=/tmp/shared
rec=/tmp/rec0
pred=/tmp/pred0
rm -rf "$rec" "$pred"
time timeout 200 dejavu-train record --backend cuda --dtype f32 --text dist/corpus-head.txt.xz \
    --out "$rec" --rows 400000 --valid-rows 20000 --length-bucket 2048 --lookahead 0 2>&1 | grep -v "wrote train"
cp "$rec/recording.json" "$OUT/"
time timeout 200 dejavu-train fit --backend cuda --recording "$rec" --out "$pred" --kinds mlp \
    --layers 1,2,3,4,5,6,7,8,9,10,11 --ranks "${RANK:-256}" 2>&1 | grep -v progress
cp "$pred/predictors.json" "$pred/fit-report.json" "$OUT/"
time timeout "${QUALITY_LIMIT:-400}" dejavu-bench quality --backend cuda --dtype f32 --predictors "$pred" \
    --mlp-densities ${MLP_DENSITIES:-0.06,0.1,0.15} --attention-densities --points calibrated \
    --zero-shot-points none --out "$OUT/quality.json"
tar czf "$OUT/autotune.tgz" target/autotune 2>/dev/null
ls -la "$OUT"
