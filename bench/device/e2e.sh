#!/usr/bin/env bash
# Device call: the end-to-end decode benchmark. transformers (fp16, eager) first, then
# `dejavu-bench e2e --backend cuda --dtype f16` reading its JSON. Expects
# dist/dejavu-bench.xz. MODELS, LENS, RUNS and LIMIT override the defaults. Writes under
# $OUT: hf.json, e2e.json (written after every row, so a cut-short run keeps what it
# measured), e2e.log.
set -uo pipefail
source bench/device/setup.sh
exec > >(tee -a "$OUT/e2e.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
models=${MODELS:-opt-6.7b,opt-13b,opt-mini,opt-1.3b}
lens=${LENS:-128,256,512,1024}
export CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal}
time timeout "${HF_LIMIT:-240}" python3 bench/peers/hf_decode.py --models "$models" --prompt-lens "$lens" \
    --new-tokens 128 --runs "${RUNS:-3}" --json "$OUT/hf.json"
time timeout "${LIMIT:-300}" dejavu-bench e2e --models "$models" --prompt-lens "$lens" --runs "${RUNS:-3}" \
    --backend cuda --dtype f16 --peer-json "$OUT/hf.json" --out "$OUT/e2e.json" ${E2E_ARGS:-}
tar czf "$OUT/autotune.tgz" target/autotune 2>/dev/null
ls -la "$OUT"
