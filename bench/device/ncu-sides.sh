#!/usr/bin/env bash
# Device call: the 6.7B decode step under Nsight Compute (bench/device/ncu-step.sh, the
# step's caches kept: NCU_CACHE=none) for each binary of SIDES (default "base new"):
# dist/dejavu-bench-<side>.xz, carried ("new" is dist/dejavu-bench.xz). Each side's files
# go to $OUT/ncu-<side>/; then per kernel of step 1 the median µs a call, side by side
# (bench/device/ncu_sides.py). EXTRA: the e2e arguments of every side.
set -uo pipefail
source bench/device/setup.sh
for side in ${SIDES:-base new}; do
    bin=dejavu-bench-$side
    [ "$side" = new ] && bin=dejavu-bench
    if [ "$side" != new ]; then xz -dc "dist/$bin.xz" > "/tmp/bin/$bin" && chmod +x "/tmp/bin/$bin"; fi
    mkdir -p "$OUT/ncu-$side"
    OUT="$OUT/ncu-$side" BIN=$bin MODELS=opt-6.7b EXTRA="${EXTRA:---f32-residual --fused-attention --fused-norms --deferred-norms}" \
        LIMIT=${NCU_LIMIT:-150} NCU_CACHE=${NCU_CACHE:-none} bash bench/device/ncu-step.sh > /dev/null 2>&1
    xz -f "$OUT/ncu-$side/ncu.csv"
done
python3 bench/device/ncu_sides.py "$OUT" ${SIDES:-base new} | tee "$OUT/ncu-sides.md"
