#!/usr/bin/env bash
# Device call: the sparse path on the H100 with the bundled predictors, through
# `dejavu-bench quality --backend cuda --dtype f32`: greedy generation of the four prompts
# of bench/device/prompts.txt (32 tokens, dense and sparse; compare with the CPU run by
# bench/device/compare_generate.py), then the perplexity sweep and/or zero-shot tasks
# (QUALITY_ARGS). Expects dist/dejavu-bench.xz. Writes under $OUT: quality.json (or
# quality.partial.json when cut short), sparse.log.
set -uo pipefail
source bench/device/setup.sh
exec > >(tee -a "$OUT/sparse.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
time timeout "${QUALITY_LIMIT:-480}" dejavu-bench quality --backend cuda --dtype f32 \
    --prompts bench/device/prompts.txt ${QUALITY_ARGS:-} --out "$OUT/quality.json"
tar czf "$OUT/autotune.tgz" target/autotune 2>/dev/null
ls -la "$OUT"
