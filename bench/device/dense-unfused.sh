#!/usr/bin/env bash
# Device call: batch-1 dense decode on `--backend cuda` (CubeBackend, no fusion), f16,
# transformers (fp16, eager) first, with a perplexity check of opt-mini on the first 4096
# WikiText-2 tokens. Expects dist/dejavu-bench.xz and dist/wt-check.txt. Writes under $OUT.
set -uo pipefail
source bench/device/setup.sh
exec > >(tee -a "$OUT/dense.log") 2>&1
models=${MODELS:-opt-mini,opt-1.3b,opt-6.7b}
time timeout 170 python3 bench/peers/hf_decode.py --models "$models" --runs "${RUNS:-5}" --json "$OUT/hf.json"
time timeout "${LIMIT:-400}" dejavu-bench dense --models "$models" --runs "${RUNS:-5}" --backend cuda --dtype f16 \
    --peer-json "$OUT/hf.json" --check-text dist/wt-check.txt --check-tokens 4096 --out "$OUT/dense.json"
