#!/usr/bin/env bash
# Device call: the 1.3B shape at prompts 128-1024 and the 30B shape at prompt 128 (transformers
# fp16 eager first for each), with the step of the 6.7B/13B headline. Writes under $OUT:
# hf-1.3b.json/.log, e2e-1.3b.json/.log, hf-30b.json/.log, e2e-30b.json/.log. SHAPES picks
# (default "1.3b 30b"); on a machine without the 1.3B shapes in the autotune cache the 1.3B
# warm-up alone takes ~115 s (run 127), so give each shape its own call there.
set -uo pipefail
export DEJAVU_COMMIT=${DEJAVU_COMMIT:-$(cat dist/commit 2>/dev/null || echo unknown)}; source bench/device/setup.sh; export CUBECL_AUTOTUNE_LEVEL=minimal
A="--readback end --f32-residual --fused-attention --fused-norms --deferred-norms --breakdown="
[[ " ${SHAPES:-1.3b 30b} " == *" 1.3b "* ]] && { timeout 90 python3 bench/peers/hf_decode.py --models opt-1.3b --prompt-lens 128,256,512,1024 --new-tokens 128 --runs 3 --json $OUT/hf-1.3b.json > $OUT/hf-1.3b.log 2>&1; echo "hf 1.3b $?"; }
[[ " ${SHAPES:-1.3b 30b} " == *" 1.3b "* ]] && { timeout ${LIMIT_13:-400} dejavu-bench e2e --models opt-1.3b --prompt-lens 128,256,512,1024 --runs 3 --backend cuda --dtype f16 $A --peer-json $OUT/hf-1.3b.json --out $OUT/e2e-1.3b.json > $OUT/e2e-1.3b.log 2>&1; echo "e2e 1.3b $?"; }
[[ " ${SHAPES:-1.3b 30b} " == *" 30b "* ]] && { timeout 160 python3 bench/peers/hf_decode.py --models opt-30b --prompt-lens 128 --new-tokens 128 --runs 3 --json $OUT/hf-30b.json > $OUT/hf-30b.log 2>&1; echo "hf 30b $?"; }
[[ " ${SHAPES:-1.3b 30b} " == *" 30b "* ]] && { timeout 165 dejavu-bench e2e --models opt-30b --prompt-lens 128 --runs 3 --backend cuda --dtype f16 $A --peer-json $OUT/hf-30b.json --out $OUT/e2e-30b.json > $OUT/e2e-30b.log 2>&1; echo "e2e 30b $?"; }
grep -hE "ms/token" $OUT/e2e-*.log
