#!/usr/bin/env bash
# Device calls: fc2 adding its split sums into an f32 accumulator with atomics
# (`accumulate_transposed_gemv`, `sparse_mlp_accumulate`: no second pass) against the
# two-pass form, and the sparse MLP against cuBLAS's dense fp16 MLP. Expects
# dist/dejavu-bench.xz and dist/commit (carried). PART picks the call:
#   kernels  every kernel checked against host loops at the 6.7B shape (the accumulating
#            ones included), then `dejavu-bench kernels` at 6.7B/13B/30B, density 0.1,
#            rank 128, with the PyTorch peer — writes kernels.json/.log (~5 min);
#   tune     grid shapes of the gathered kernels at 6.7B, density 0.1, each checked
#            first (`--tune --check`) — writes tune.json/.log;
#   all      both, in one call (~5 min);
#   sweep    the kernel checks at 6.7B (densities 0.05 and 0.1), then `dejavu-bench
#            kernels` at densities 0.05–1.0 — writes kernels.json/.log;
#   repeat   `dejavu-bench kernels` three times at 6.7B and 30B, density 0.1 — writes
#            kernels-{1,2,3}.json/.log.
set -uo pipefail
export DEJAVU_COMMIT=${DEJAVU_COMMIT:-$(cat dist/commit 2>/dev/null || echo unknown)}
source bench/device/setup.sh
export CUBECL_AUTOTUNE_LEVEL=minimal
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
run_part() {
case "$1" in
kernels)
    timeout 150 dejavu-bench kernels --check --models opt-6.7b --densities 0.1 --ranks 128 --contexts 256 \
        --head-densities 0.5 --calls 20 --samples 3 --peer-python "" --out "$OUT/checks.json" > "$OUT/checks.log" 2>&1
    echo "kernel checks: $(grep -cE ' ok$' "$OUT/checks.log") ok, $(grep -ciE 'fail' "$OUT/checks.log") failing lines"
    grep -E "accumulate" "$OUT/checks.log" | head -6
    rm -f "$OUT/checks.json"
    time timeout 400 dejavu-bench kernels --densities 0.1 --ranks 128 --contexts \
        --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
    grep -E "accumulate|sparse_mlp|fc2t_gather|predicted_mlp|\| opt-" "$OUT/kernels.log" | grep -vE "ours_attention|tune_|select|norm" | tail -40
    ;;
sweep)
    timeout 150 dejavu-bench kernels --check --models opt-6.7b --densities 0.05,0.1 --ranks 128 --contexts 256 \
        --head-densities 0.5 --calls 20 --samples 3 --peer-python "" --out "$OUT/checks.json" > "$OUT/checks.log" 2>&1
    echo "kernel checks: $(grep -cE ' ok$' "$OUT/checks.log") ok, $(grep -ciE 'fail' "$OUT/checks.log") failing lines"
    rm -f "$OUT/checks.json"
    time timeout 420 dejavu-bench kernels --densities 0.05,0.1,0.25,0.5,1.0 --ranks 128 --contexts \
        --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
    grep -E "^\| opt-[0-9.]+b \| [0-9.]+ \|" "$OUT/kernels.log"
    ;;
repeat)
    # The kernel bench three times at 6.7B and 30B, density 0.1 (run-to-run spread of the
    # sparse MLP's median is ~1-2 µs): the goal is read from the median of the runs.
    for run in 1 2 3; do
        timeout 180 dejavu-bench kernels --models opt-6.7b,opt-30b --densities 0.1 --ranks 128 --contexts \
            --out "$OUT/kernels-$run.json" > "$OUT/kernels-$run.log" 2>&1
        echo "--- run $run"; grep -E "^\| opt-[0-9.]+b \| [0-9.]+ \|" "$OUT/kernels-$run.log"
    done
    ;;
tune)
    time timeout 500 dejavu-bench kernels --tune --check --models opt-6.7b --densities 0.1 --ranks 128 --contexts \
        --out "$OUT/tune.json" > "$OUT/tune.log" 2>&1
    echo "checks: $(grep -cE ' ok$' "$OUT/tune.log") ok, $(grep -ciE 'fail' "$OUT/tune.log") failing lines"
    grep -E "tune_|sparse_mlp|fc2t_gather" "$OUT/tune.log" | tail -50
    ;;
esac
}
if [ "${PART:-kernels}" = all ]; then run_part kernels; run_part tune; else run_part "${PART:-kernels}"; fi
