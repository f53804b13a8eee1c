#!/usr/bin/env bash
# Device calls: the decode step's residual stream kept in f32 (`--f32-residual`: attention
# with out_proj in one launch and fc2 in one launch, both adding into the residual with
# f32 atomics) against the default step (f16 residual; attention, out_proj, fc2's two
# passes as separate launches). Expects dist/dejavu-bench.xz and dist/commit (carried).
# PART picks the call:
#   e2e     transformers fp16 eager at 6.7B and 13B, prompt 128, then `dejavu-bench e2e`
#           for each of VARIANTS (default "f16res f32res": the default step, then
#           --f32-residual; f32fused: --f32-residual --fused-attention), token kept on the
#           device — hf.json, e2e-<variant>.json/.log (~4 min); PROMPTS sets the prompt
#           lengths (default 128), HF=0 leaves transformers out;
#   ab      transformers as in e2e, --f32-residual --fused-attention (attention and out_proj in one launch), then
#           the default step again — e2e-f32fused.json/.log, e2e-f16res-2.json/.log;
#   checks  every kernel checked against host loops at the 6.7B shape (the fused attention
#           and out_proj included) — checks.log (~3 min).
set -uo pipefail
export DEJAVU_COMMIT=${DEJAVU_COMMIT:-$(cat dist/commit 2>/dev/null || echo unknown)}
source bench/device/setup.sh
export CUBECL_AUTOTUNE_LEVEL=minimal
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
e2e() { # variant suffix
    extra=""; [ "$1" = f32res ] && extra="--f32-residual"; [ "$1" = f32fused ] && extra="--f32-residual --fused-attention"
    peer=""; [ -f "$OUT/hf.json" ] && peer="--peer-json $OUT/hf.json"; [ "${HF:-1}" = 0 ] && peer="--peer-python="
    timeout 240 dejavu-bench e2e --models opt-6.7b,opt-13b --prompt-lens ${PROMPTS:-128} --runs 3 --backend cuda --dtype f16 \
        --readback end $extra $peer --out "$OUT/e2e-$1$2.json" > "$OUT/e2e-$1$2.log" 2>&1
    echo "--- $1$2 (exit $?)"; grep -E "ms/token|floor|sparse.*(host|device)" "$OUT/e2e-$1$2.log" | tail -10
}
hf() {
    timeout 120 python3 bench/peers/hf_decode.py --models opt-6.7b,opt-13b --prompt-lens 128 --new-tokens 128 --runs 3 \
        --json "$OUT/hf.json" > "$OUT/hf.log" 2>&1; tail -2 "$OUT/hf.log"
}
case "${PART:-e2e}" in
e2e)
    [ "${HF:-1}" = 1 ] && hf
    for v in ${VARIANTS:-f16res f32res}; do e2e "$v" ""; done
    ;;
ab)
    hf
    e2e f32fused ""
    e2e f16res -2
    ;;
checks)
    timeout 150 dejavu-bench kernels --check --models opt-6.7b --densities 0.1 --ranks 128 --contexts 256 \
        --head-densities 0.5 --calls 20 --samples 3 --peer-python "" --out "$OUT/checks.json" > "$OUT/checks.log" 2>&1
    echo "kernel checks: $(grep -cE ' ok$' "$OUT/checks.log") ok, $(grep -ciE 'fail' "$OUT/checks.log") failing lines"
    grep -E "attention_out_proj|f32 in|f32 residual|accumulate_transposed_gemv\+bias" "$OUT/checks.log" | head -12
    rm -f "$OUT/checks.json"
    ;;
esac
