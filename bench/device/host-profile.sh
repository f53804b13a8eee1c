#!/usr/bin/env bash
# Device call: where the host's time goes, and compiled transformers. dejavu-bench e2e at
# the 6.7B and 13B shapes, prompt 128, token on the device, with --host-profile (a binary
# built with CARGO_PROFILE_RELEASE_STRIP=none and --features dejavu-bench/host-profile,
# stripped of debug info only, so that it keeps its symbols; carry target/autotune, or the
# first rows spend minutes autotuning); then transformers with a static cache, generate()
# compiling its decode step, at prompt 128. PEER_JSON: transformers eager times from an
# earlier call. Writes under $OUT: e2e-prof.json/.log, host-profile.txt,
# hf-compile.json/.log.
set -uo pipefail
export DEJAVU_COMMIT=${DEJAVU_COMMIT:-$(cat dist/commit 2>/dev/null || echo unknown)}
source bench/device/setup.sh
export CUBECL_AUTOTUNE_LEVEL=minimal
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 200 dejavu-bench e2e --models opt-6.7b,opt-13b --prompt-lens 128 --runs 3 --backend cuda --dtype f16 --readback end \
    --peer-json "${PEER_JSON:-dist/hf.json}" --breakdown "" --host-profile "$OUT/host-profile.txt" \
    --out "$OUT/e2e-prof.json" > "$OUT/e2e-prof.log" 2>&1
grep -E "ms/token" "$OUT/e2e-prof.log"
timeout 300 python3 bench/peers/hf_decode.py --mode static-compile --models opt-6.7b,opt-13b --prompt-lens 128 \
    --new-tokens 128 --runs 3 --json "$OUT/hf-compile.json" > "$OUT/hf-compile.log" 2>&1
echo "static-compile exit $?"; grep -E "^transformers|warmed up|Error" "$OUT/hf-compile.log" | tail -6
