#!/usr/bin/env bash
# Device call: the lazy K/V write (only the heads a step reads, missed tokens recomputed
# from a 16-step window) against every head's K/V written each step, side by side.
#  1. the kernels checked against host loops at the 6.7B shape, qkv_append_lazy over a
#     40-step decode included;
#  2. transformers fp16 eager, 6.7B and 13B, prompt 128;
#  3. dejavu-bench e2e with the token kept on the device, lazy (window 16) for opt-mini,
#     6.7B and 13B, then every head's K/V (window 0) for 6.7B and 13B;
#  4. greedy generation of bench/device/prompts.txt on opt-mini through the sparse path
#     (lazy), --backend cuda --dtype f32, for the comparison with the CPU's tokens.
# About 6 minutes on a fresh H100. Writes under $OUT: kernels.*, hf.*, e2e-lazy.*,
# e2e-every-head.*, generate.json/.log.
set -uo pipefail
export DEJAVU_COMMIT=${DEJAVU_COMMIT:-$(cat dist/commit 2>/dev/null || echo unknown)}
source bench/device/setup.sh
export CUBECL_AUTOTUNE_LEVEL=minimal
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 100 dejavu-bench kernels --check --models opt-6.7b --densities 0.1 --ranks 128 --contexts 256 \
    --head-densities 0.5 --calls 20 --samples 3 --peer-python "" --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
echo "checks ok: $(grep -cE ' ok$' "$OUT/kernels.log"), failed: $(grep -c FAILED "$OUT/kernels.log")"; grep -E "qkv_append_lazy" "$OUT/kernels.log"
timeout 110 python3 bench/peers/hf_decode.py --models opt-6.7b,opt-13b --prompt-lens 128 --new-tokens 128 --runs 3 \
  --json "$OUT/hf.json" > "$OUT/hf.log" 2>&1; tail -2 "$OUT/hf.log"
for window in 16 0; do
  name=$([ "$window" = 0 ] && echo every-head || echo lazy)
  models=$([ "$window" = 0 ] && echo opt-6.7b,opt-13b || echo opt-mini,opt-6.7b,opt-13b)
  timeout 150 dejavu-bench e2e --models "$models" --prompt-lens 128 --runs 3 --backend cuda --dtype f16 --readback end \
    --lazy-kv-window "$window" --peer-json "$OUT/hf.json" --breakdown "" --opt-mini-points threshold \
    --out "$OUT/e2e-$name.json" > "$OUT/e2e-$name.log" 2>&1
  echo "== $name (window $window)"; grep -E "^\| opt" "$OUT/e2e-$name.log" | head -12
done
timeout 120 dejavu-bench quality --backend cuda --dtype f32 --prompts bench/device/prompts.txt --skip-perplexity --texts bench/device/prompts.txt \
  --zero-shot-points none --out "$OUT/generate.json" > "$OUT/generate.log" 2>&1; tail -3 "$OUT/generate.log"
