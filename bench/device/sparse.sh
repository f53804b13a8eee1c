#!/usr/bin/env bash
# Device call: the sparse path on the H100 with the bundled predictors, through
# `dejavu-bench quality --backend cuda --dtype f32`: greedy generation of the four prompts
# of bench/device/prompts.txt (32 tokens, dense and sparse; compare with the CPU run by
# bench/device/compare_generate.py), then the perplexity sweep and/or zero-shot tasks
# (QUALITY_ARGS). Expects dist/dejavu-bench.xz and dist/shared.tar.xz (made with
# `tar cJf dist/shared.tar.xz -C ../shared text/wikitext2-test.txt text/corpus-valid.txt.xz tasks/*.jsonl`). Writes under $OUT: quality.json (or
# quality.partial.json when cut short), sparse.log.
set -uo pipefail
source bench/device/setup.sh
exec > >(tee -a "$OUT/sparse.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# The shared texts and tasks travel as dist/shared.tar.xz (../shared is not carried):
# WikiText-2 test, the corpus valid split and the task files, unpacked as $DEJAVU_ASSETS.
if [ -f dist/shared.tar.xz ]; then
    mkdir -p /tmp/shared && tar xJf dist/shared.tar.xz -C /tmp/shared && export DEJAVU_ASSETS=/tmp/shared
fi
time timeout "${QUALITY_LIMIT:-480}" dejavu-bench quality --backend cuda --dtype f32 \
    --prompts bench/device/prompts.txt ${QUALITY_ARGS:-} --out "$OUT/quality.json"
tar czf "$OUT/autotune.tgz" target/autotune 2>/dev/null
ls -la "$OUT"
