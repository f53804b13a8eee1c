#!/usr/bin/env bash
# Device call: two dejavu-bench binaries side by side — dist/dejavu-bench.xz (B, the
# newer) and dist/dejavu-bench-a.xz (A) — `dejavu-bench kernels` at one shape, density
# 0.1, no PyTorch peer, alternating A and B RUNS times (default 3), to tell a code change
# from run-to-run spread. Writes ab-{a,b}-<run>.json (the logs stay in /tmp: the device
# returns a limited number of files).
set -uo pipefail
source bench/device/setup.sh
export CUBECL_AUTOTUNE_LEVEL=minimal
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
xz -dc dist/dejavu-bench-a.xz > /tmp/bin/dejavu-bench-a && chmod +x /tmp/bin/dejavu-bench-a
for run in $(seq 1 "${RUNS:-3}"); do
    for side in a b; do
        bin=dejavu-bench; commit=$(cat dist/commit)
        [ "$side" = a ] && { bin=dejavu-bench-a; commit=$(cat dist/commit-a); }
        DEJAVU_COMMIT=$commit timeout 120 "$bin" kernels --models "${MODEL:-opt-6.7b}" --densities 0.1 --ranks 128 --contexts \
            --peer-python "" --out "$OUT/ab-$side-$run.json" > "/tmp/ab-$side-$run.log" 2>&1
        echo "$side ($commit) run $run: $(grep -E 'ours_(sparse_mlp|sparse_mlp_accumulate|fc2t_gather|fc2t_gather_accumulate) ' "/tmp/ab-$side-$run.log" | awk '{printf "%s %s  ", $1, $4}')"
    done
done
