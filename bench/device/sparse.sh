#!/usr/bin/env bash
# Device call: the sparse path on the H100. Greedy generation of the four prompts of
# bench/device/prompts.txt through the sparse path with the bundled predictors (CUDA f32,
# 32 tokens each; compare with the CPU run by bench/device/compare_generate.py), then the
# quality sweep (dejavu-bench quality --backend cuda). Expects dist/dejavu.xz and
# dist/dejavu-bench.xz. Writes under $OUT: gen-cuda-N.json, quality.json, sparse.log.
set -uo pipefail
source bench/device/setup.sh
exec > >(tee -a "$OUT/sparse.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if [ -z "${SKIP_GENERATE:-}" ]; then
    i=0
    while IFS= read -r prompt; do
        i=$((i + 1))
        dejavu generate "$prompt" --backend cuda --dtype f32 --max-new-tokens 32 --ignore-eos \
            --predictors --json "$OUT/gen-cuda-$i.json"
    done < bench/device/prompts.txt
fi
time timeout "${QUALITY_LIMIT:-480}" dejavu-bench quality --backend cuda --dtype f32 ${QUALITY_ARGS:-} \
    --out "$OUT/quality.json"
tar czf "$OUT/autotune.tgz" target/autotune 2>/dev/null
ls -la "$OUT"
