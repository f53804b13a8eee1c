#!/usr/bin/env bash
# Device call: the OPT-30B shape (60 GB of f16 weights: ours with the weights re-laid in
# place, then transformers in its own process) at prompt 128 with the token on the device,
# and opt-mini over the prompt lengths with each token read (PEER_JSON: transformers'
# times for opt-mini from an earlier call). Writes under $OUT: hf-30b.json/.log,
# e2e-30b.json/.log, e2e-mini.json/.log.
set -uo pipefail
export DEJAVU_COMMIT=${DEJAVU_COMMIT:-$(cat dist/commit 2>/dev/null || echo unknown)}
source bench/device/setup.sh
export CUBECL_AUTOTUNE_LEVEL=minimal
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 90 dejavu-bench e2e --models opt-mini --prompt-lens "${LENS:-128,256,512,1024}" --runs 3 --backend cuda --dtype f16 \
    --peer-json "${PEER_JSON:-dist/hf.json}" --opt-mini-points threshold --breakdown "" --out "$OUT/e2e-mini.json" > "$OUT/e2e-mini.log" 2>&1
echo "opt-mini exit $?"; grep -E "ms/token|Error|recorded" "$OUT/e2e-mini.log"
timeout 200 python3 bench/peers/hf_decode.py --models opt-30b --prompt-lens 128 --new-tokens 128 --runs 3 \
    --json "$OUT/hf-30b.json" > "$OUT/hf-30b.log" 2>&1
echo "transformers 30b exit $?"; tail -2 "$OUT/hf-30b.log"
timeout 220 dejavu-bench e2e --models opt-30b --prompt-lens 128 --runs 3 --backend cuda --dtype f16 --readback end \
    --peer-json "$OUT/hf-30b.json" --breakdown "" --out "$OUT/e2e-30b.json" > "$OUT/e2e-30b.log" 2>&1
echo "ours 30b exit $?"; grep -E "ms/token|Error|memory" "$OUT/e2e-30b.log" | head; grep -E "^\| opt-30b" "$OUT/e2e-30b.log" | head -12
