#!/usr/bin/env bash
# Device call: transformers fp16 eager, then dejavu-bench e2e with the greedy token kept on
# the device (--readback end: the host reads the tokens once at the end, inside the timing,
# and enqueues step t+1 while the GPU runs step t), 6.7B and 13B shapes, prompt 128. About
# 70 s on a fresh H100. Set DEJAVU_COMMIT to the binary's commit. Writes under $OUT:
# hf.json/.log, e2e.json/.log.
set -uo pipefail
export DEJAVU_COMMIT=${DEJAVU_COMMIT:-$(cat dist/commit 2>/dev/null || echo unknown)}
source bench/device/setup.sh
export CUBECL_AUTOTUNE_LEVEL=minimal
models=${MODELS:-opt-6.7b,opt-13b}
timeout 110 python3 bench/peers/hf_decode.py --models "$models" --prompt-lens 128 --new-tokens 128 --runs 3 \
  --json "$OUT/hf.json" > "$OUT/hf.log" 2>&1; tail -2 "$OUT/hf.log"
timeout 130 dejavu-bench e2e --models "$models" --prompt-lens 128 --runs 3 --backend cuda --dtype f16 --readback end \
  --peer-json "$OUT/hf.json" --breakdown "" --out "$OUT/e2e.json" > "$OUT/e2e.log" 2>&1; tail -24 "$OUT/e2e.log"
