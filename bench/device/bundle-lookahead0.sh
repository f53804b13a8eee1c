#!/usr/bin/env bash
# Device call: the bundled predictor folder, trained without the lookahead. Records
# opt-mini's 400k + 20k rows with --lookahead 0, fits layers 1-11 (layer 0 stays dense, as
# under lookahead 1) — MLP predictors at rank 256, attention predictors at rank 128 (their
# recall did not depend on rank, runs 13-14) — then scores the folder with the quality sweep
# (dense and its calibrated point), so the ~16 MB folder never has to travel to the device
# (the tree is capped at 64 MiB). On a machine without an autotune cache the recording
# (~150 s) and the fit (~300 s) fill one call: run the script again while the machine is
# still warm and it finds the recording and the folder in /tmp and goes on from there
# (run F took two calls, the second by hand). Expects in dist/: dejavu-train.xz,
# dejavu-bench.xz, corpus-head.txt.xz (train.sh), shared.tar.xz (sparse.sh) and
# opt-mini-model.safetensors.xz (`xz -9` of assets/opt-mini's weights). Writes under $OUT:
# bundle.log, recording.json, predictors.tar (the folder) and quality.json.
set -uo pipefail
export DEJAVU_COMMIT=${DEJAVU_COMMIT:-$(cat dist/commit 2>/dev/null || echo unknown)}
source bench/device/setup.sh
exec > >(tee -a "$OUT/bundle.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
cat dist/commit
mkdir -p assets/opt-mini
if [ ! -f assets/opt-mini/model.safetensors ]; then
    xz -dc dist/opt-mini-model.safetensors.xz > assets/opt-mini/model.safetensors
fi
mkdir -p /tmp/shared && tar xJf dist/shared.tar.xz -C /tmp/shared && export DEJAVU_ASSETS=/tmp/shared
rec=/tmp/rec0
pred=/tmp/opt-mini-predictors
# `record` resumes an interrupted recording and ends at once on a complete one.
time timeout 200 dejavu-train record --backend cuda --dtype f32 --text dist/corpus-head.txt.xz \
    --out "$rec" --rows 400000 --valid-rows 20000 --length-bucket 2048 --lookahead 0 2>&1 | grep -v "wrote train"
cp "$rec/recording.json" "$OUT/"
if [ ! -f "$pred/predictors.json" ]; then
    time timeout 330 dejavu-train fit --backend cuda --recording "$rec" --out "$pred" \
        --layers 1,2,3,4,5,6,7,8,9,10,11 --ranks 256 --attention-ranks 128 2>&1 | grep -v progress
    rm -rf "$pred/training"
    tar cf "$OUT/predictors.tar" -C /tmp opt-mini-predictors
else
    time timeout "${QUALITY_LIMIT:-300}" dejavu-bench quality --backend cuda --dtype f32 --predictors "$pred" \
        --mlp-densities --attention-densities --points calibrated --zero-shot-points none --out "$OUT/quality.json"
fi
ls -la "$OUT"
