#!/usr/bin/env bash
# Device call: where the host's time goes. dejavu-bench e2e at the 6.7B and 13B shapes,
# prompt 128, token on the device, with --host-profile (needs a binary built with the
# host-profile feature and stripped of debug info only, so that it keeps its symbols);
# opt-mini over the prompt lengths with each token read (PEER_JSON: transformers' times
# from an earlier call); transformers with a static cache under torch.compile at prompt
# 128. Writes under $OUT: e2e-prof.json/.log, host-profile.txt, e2e-mini.json/.log,
# hf-compile.json/.log.
set -uo pipefail
export DEJAVU_COMMIT=${DEJAVU_COMMIT:-$(cat dist/commit 2>/dev/null || echo unknown)}
source bench/device/setup.sh
export CUBECL_AUTOTUNE_LEVEL=minimal
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 150 dejavu-bench e2e --models opt-6.7b,opt-13b --prompt-lens 128 --runs 3 --backend cuda --dtype f16 --readback end \
    --peer-json "${PEER_JSON:-dist/hf.json}" --breakdown "" --host-profile "$OUT/host-profile.txt" \
    --out "$OUT/e2e-prof.json" > "$OUT/e2e-prof.log" 2>&1
grep -E "ms/token" "$OUT/e2e-prof.log"
timeout 100 dejavu-bench e2e --models opt-mini --prompt-lens "${LENS:-128,256,512,1024}" --runs 3 --backend cuda --dtype f16 \
    --peer-json "${PEER_JSON:-dist/hf.json}" --opt-mini-points threshold --breakdown "" --out "$OUT/e2e-mini.json" > "$OUT/e2e-mini.log" 2>&1
grep -E "ms/token|Error" "$OUT/e2e-mini.log"
timeout 300 python3 bench/peers/hf_decode.py --mode static-compile --models opt-6.7b,opt-13b --prompt-lens 128 \
    --new-tokens 128 --runs 3 --json "$OUT/hf-compile.json" > "$OUT/hf-compile.log" 2>&1
echo "static-compile exit $?"; grep -E "^transformers|compiled|Error" "$OUT/hf-compile.log" | tail -6
