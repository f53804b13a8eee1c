#!/usr/bin/env bash
# Device call: the end-to-end sweep over prompt lengths with the token kept on the device.
# Kernel checks at the 6.7B shape, transformers fp16 eager for every model and length,
# dejavu-bench e2e (dense, sparse at the paper's setting, opt-mini at its threshold point)
# for the same, then the 6.7B and 13B sparse rows again with the predictors read in f16
# (--predictors-in-model-dtype). About 450 s on a fresh H100. Set DEJAVU_COMMIT to the
# binary's commit. Writes under $OUT: kernels.log, hf.json/.log, e2e.json/.log,
# e2e-half.json/.log.
set -uo pipefail
export DEJAVU_COMMIT=${DEJAVU_COMMIT:-$(cat dist/commit 2>/dev/null || echo unknown)}
source bench/device/setup.sh
export CUBECL_AUTOTUNE_LEVEL=minimal
models=${MODELS:-opt-6.7b,opt-13b,opt-1.3b,opt-mini}
lens=${LENS:-128,256,512,1024}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 60 dejavu-bench kernels --check --models opt-6.7b --densities 0.1 --ranks 128 --contexts 256 \
    --head-densities 0.5 --calls 20 --samples 3 --peer-python "" --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
echo "kernel checks ok: $(grep -cE ' ok$' "$OUT/kernels.log")"; grep -iE "fail" "$OUT/kernels.log" | head
rm -f "$OUT/kernels.json"
timeout 190 python3 bench/peers/hf_decode.py --models "$models" --prompt-lens "$lens" --new-tokens 128 --runs 3 \
    --json "$OUT/hf.json" > "$OUT/hf.log" 2>&1; tail -2 "$OUT/hf.log"
timeout 250 dejavu-bench e2e --models "$models" --prompt-lens "$lens" --runs 3 --backend cuda --dtype f16 --readback end \
    --peer-json "$OUT/hf.json" --opt-mini-points threshold --breakdown "" --out "$OUT/e2e.json" > "$OUT/e2e.log" 2>&1
timeout 80 dejavu-bench e2e --models opt-6.7b,opt-13b --prompt-lens 128 --runs 3 --backend cuda --dtype f16 --readback end \
    --predictors-in-model-dtype --peer-json "$OUT/hf.json" --breakdown "" --out "$OUT/e2e-half.json" > "$OUT/e2e-half.log" 2>&1
grep -E "ms/token|floor" "$OUT/e2e.log" | tail -40
echo "--- predictors in f16"; grep -E "ms/token" "$OUT/e2e-half.log"
