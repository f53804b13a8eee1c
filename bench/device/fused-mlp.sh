#!/usr/bin/env bash
# Device calls: the fused predicted MLP (`predicted_mlp`: predictor, selection, fc1 and
# fc2's split sums in one launch) against the separate kernels it replaces in the decode
# step. Expects dist/dejavu-bench.xz and dist/commit (carried). PART picks the call:
#   kernels  every kernel checked against host loops at the 6.7B shape (the fused MLP
#            included), then `dejavu-bench kernels` at 6.7B/13B/30B, density 0.1, rank
#            128, with the PyTorch peer (dense fp16 MLP through cuBLAS) — writes
#            kernels.json/.log (~5 min);
#   e2e      transformers fp16 eager at 6.7B and 13B, prompt 128, then `dejavu-bench e2e`
#            with the fused MLP (--fused-mlp) and with the separate kernels (the default),
#            token kept on the device — writes hf.json, e2e-fused.json/.log,
#            e2e-separate.json/.log (~5 min). (Run 31 ran binary 6817ace, where the fused
#            MLP was the default and --separate-mlp-kernels chose the other.)
set -uo pipefail
export DEJAVU_COMMIT=${DEJAVU_COMMIT:-$(cat dist/commit 2>/dev/null || echo unknown)}
source bench/device/setup.sh
export CUBECL_AUTOTUNE_LEVEL=minimal
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
case "${PART:-kernels}" in
kernels)
    timeout 150 dejavu-bench kernels --check --models opt-6.7b --densities 0.1 --ranks 128 --contexts 256 \
        --head-densities 0.5 --calls 20 --samples 3 --peer-python "" --out "$OUT/checks.json" > "$OUT/checks.log" 2>&1
    echo "kernel checks: $(grep -cE ' ok$' "$OUT/checks.log") ok, $(grep -ciE 'fail' "$OUT/checks.log") failing lines"
    grep -E "predicted_mlp" "$OUT/checks.log" | head -4
    rm -f "$OUT/checks.json"
    time timeout 400 dejavu-bench kernels --densities 0.1 --ranks 128 --contexts \
        --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
    grep -E "predicted_mlp|fused predictor|\| opt-" "$OUT/kernels.log" | grep -vE "ours_attention|tune_" | tail -40
    ;;
e2e)
    timeout 150 python3 bench/peers/hf_decode.py --models opt-6.7b,opt-13b --prompt-lens 128 --new-tokens 128 --runs 3 \
        --json "$OUT/hf.json" > "$OUT/hf.log" 2>&1; tail -2 "$OUT/hf.log"
    for variant in fused separate; do
        extra=""; [ "$variant" = fused ] && extra="--fused-mlp"
        timeout 170 dejavu-bench e2e --models opt-6.7b,opt-13b --prompt-lens 128 --runs 3 --backend cuda --dtype f16 \
            --readback end $extra --peer-json "$OUT/hf.json" --out "$OUT/e2e-$variant.json" > "$OUT/e2e-$variant.log" 2>&1
        echo "--- $variant"; grep -E "ms/token|floor|sparse_mlp" "$OUT/e2e-$variant.log" | tail -12
    done
    ;;
esac
