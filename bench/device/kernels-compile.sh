#!/usr/bin/env bash
# Device call: the kernel benchmark with its PyTorch peers at the 6.7B, 13B and 30B
# shapes (`dejavu-bench kernels --check --tune`, ~170 s), opt-mini's end-to-end rows over
# the prompt lengths with each token read back (PEER_JSON: transformers' times from an
# earlier call of the same session), and transformers with a static cache under
# torch.compile (reduce-overhead) at prompt 128 for the 6.7B and 13B shapes. Set
# DEJAVU_COMMIT. Writes under $OUT: kernels.json/.log, e2e-mini.json/.log,
# hf-compile.json/.log.
set -uo pipefail
export DEJAVU_COMMIT=${DEJAVU_COMMIT:-$(cat dist/commit 2>/dev/null || echo unknown)}
source bench/device/setup.sh
export CUBECL_AUTOTUNE_LEVEL=minimal
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 230 dejavu-bench kernels --check --tune --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
echo "kernels: exit $?, checks ok: $(grep -cE ' ok$' "$OUT/kernels.log")"; grep -iE "fail" "$OUT/kernels.log" | head -5
grep -A30 "sparse MLP kernels" "$OUT/kernels.log" | head -40
timeout 90 dejavu-bench e2e --models opt-mini --prompt-lens "${LENS:-128,256,512,1024}" --runs 3 --backend cuda --dtype f16 \
    --peer-json "${PEER_JSON:-dist/hf.json}" --opt-mini-points threshold --breakdown "" --out "$OUT/e2e-mini.json" > "$OUT/e2e-mini.log" 2>&1
grep -E "ms/token" "$OUT/e2e-mini.log"
timeout 240 python3 bench/peers/hf_decode.py --mode static-compile --models opt-6.7b,opt-13b --prompt-lens 128 \
    --new-tokens 128 --runs 3 --json "$OUT/hf-compile.json" > "$OUT/hf-compile.log" 2>&1
echo "static-compile exit $?"; grep -E "transformers|compiled|Error|error" "$OUT/hf-compile.log" | tail -8
