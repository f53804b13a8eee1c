#!/usr/bin/env bash
# Device call: `dejavu-bench e2e` for the small models, one process each (opt-1.3b with the
# one-layer breakdown at 6.7B, then opt-mini with its trained predictors, traced), against
# transformers run first in the same call. Expects dist/dejavu-bench.xz. Writes under $OUT:
# hf.json, e2e-1.3b.json, e2e-mini.json, e2e.log.
set -uo pipefail
source bench/device/setup.sh
exec > >(tee -a "$OUT/e2e.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
lens=${LENS:-128,256,512,1024}
export CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal}
time timeout 150 python3 bench/peers/hf_decode.py --models opt-mini,opt-1.3b --prompt-lens "$lens" \
    --new-tokens 128 --runs 3 --json "$OUT/hf.json"
time timeout 200 dejavu-bench e2e --models opt-1.3b --prompt-lens "$lens" --backend cuda --dtype f16 \
    --peer-json "$OUT/hf.json" --out "$OUT/e2e-1.3b.json"
RUST_LOG=dejavu_bench=debug time timeout "${MINI_LIMIT:-150}" dejavu-bench e2e --models opt-mini --prompt-lens "$lens" \
    --backend cuda --dtype "${MINI_DTYPE:-f16}" --opt-mini-points "${MINI_POINTS:-threshold;calibrated}" --breakdown= \
    --peer-json "$OUT/hf.json" --out "$OUT/e2e-mini.json"
tar czf "$OUT/autotune.tgz" target/autotune 2>/dev/null
