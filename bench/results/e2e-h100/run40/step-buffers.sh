#!/usr/bin/env bash
# Device call: decode steps whose buffers come from the allocator's pool of fixed sizes
# (the decode hooks' default since this script: CubeCL's persistent memory turned on for a
# run's first step) against the default pool (`--no-step-buffer-pool`). The allocator is
# the process's, so each side is its own `dejavu-bench e2e` process, in the order ORDER
# (default "off on off on": off = --no-step-buffer-pool). MODELS (default
# opt-1.3b,opt-6.7b), PROMPTS (default 128), EXTRA (default "--f32-residual
# --fused-attention") go to every run; token kept on the device, 3 timed runs a row,
# no transformers peer. Writes e2e-<side>-<i>.json/.log under $OUT (~80 s a process at
# the defaults, more for the first on a fresh machine: LIMIT, default 150, bounds each).
# The logs give each timed run's CPU time per step by thread (model, device server).
# Expects dist/dejavu-bench.xz (carried); the binary names its own commit.
set -uo pipefail
source bench/device/setup.sh
export CUBECL_AUTOTUNE_LEVEL=minimal
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
i=0
for side in ${ORDER:-off on off on}; do
    i=$((i + 1))
    flag=""; [ "$side" = off ] && flag="--no-step-buffer-pool"
    timeout ${LIMIT:-150} dejavu-bench e2e --models "${MODELS:-opt-1.3b,opt-6.7b}" --prompt-lens "${PROMPTS:-128}" --runs 3 \
        --backend cuda --dtype f16 --readback end --breakdown "" --peer-python= ${EXTRA---f32-residual --fused-attention} $flag \
        --out "$OUT/e2e-$side-$i.json" > "$OUT/e2e-$side-$i.log" 2>&1
    echo "--- $side $i (exit $?)"
    grep -E "^\| opt.*\| (host|device)" "$OUT/e2e-$side-$i.log"
    grep -E "CPU µs per step|ms/token \(floor" "$OUT/e2e-$side-$i.log"
done
