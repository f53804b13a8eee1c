#!/usr/bin/env bash
# Device call (issue 3): record opt-mini's 400k + 20k rows, then compare attention
# predictor losses, lookaheads and a nonlinear capacity bound on them with PyTorch
# (bench/device/attention_loss.py). Expects dist/dejavu-train.xz, dist/corpus-head.txt.xz
# and a carried target/autotune. Writes attention-loss.log and attention-loss.json under $OUT.
set -uo pipefail
source bench/device/setup.sh
exec > >(tee -a "$OUT/attention-loss.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, safetensors, numpy; print('torch', torch.__version__, 'safetensors', safetensors.__version__)"
rec=/tmp/rec
rm -rf "$rec"
time timeout "${RECORD_LIMIT:-240}" dejavu-train record --backend cuda --dtype f32 \
    --text dist/corpus-head.txt.xz --out "$rec" --rows "${ROWS:-400000}" --valid-rows "${VALID_ROWS:-20000}" --length-bucket 2048
cp "$rec/recording.json" "$OUT/" 2>/dev/null
time timeout "${FIT_LIMIT:-300}" python3 bench/device/attention_loss.py "$rec" "$OUT/attention-loss.json" ${LOSS_ARGS:-}
