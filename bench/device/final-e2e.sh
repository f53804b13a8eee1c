#!/usr/bin/env bash
# Device call behind the README's headline table: the kernels checked against host loops
# at the 6.7B shape (with their timings), transformers fp16 eager for opt-mini, 6.7B and 13B,
# then dejavu-bench e2e for the same models at prompt 128 (dense, sparse at the paper's
# setting, opt-mini at its trained threshold point; opt-mini's row first checks kernel
# decode against tensor-op decode). About 190 s on a fresh H100. Set DEJAVU_COMMIT to the
# binary's commit (the device has no git). Writes under $OUT: kernels.json/.log,
# hf.json/.log, e2e.json/.log.
set -uo pipefail
export DEJAVU_COMMIT=${DEJAVU_COMMIT:-$(cat dist/commit 2>/dev/null || echo unknown)}
source bench/device/setup.sh
export CUBECL_AUTOTUNE_LEVEL=minimal
models=${MODELS:-opt-mini,opt-6.7b,opt-13b}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 90 dejavu-bench kernels --check --models opt-6.7b --densities 0.1 --ranks 128 --contexts 256 \
    --head-densities 0.5 --calls 20 --samples 3 --peer-python "" --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
grep -cE " ok$" "$OUT/kernels.log"; grep -E "FAIL|fail|attn_out|ours_attention" "$OUT/kernels.log" | head
timeout 170 python3 bench/peers/hf_decode.py --models "$models" --prompt-lens 128 --new-tokens 128 --runs 3 \
    --json "$OUT/hf.json" > "$OUT/hf.log" 2>&1; tail -3 "$OUT/hf.log"
timeout 260 dejavu-bench e2e --models "$models" --prompt-lens 128 --runs 3 --backend cuda --dtype f16 \
  --peer-json "$OUT/hf.json" --opt-mini-points threshold --out "$OUT/e2e.json" > "$OUT/e2e.log" 2>&1; tail -32 "$OUT/e2e.log"
