#!/usr/bin/env bash
# Device call: the one-launch attention with out_proj touching its cube's rows of out_proj
# into the caches while the attention runs (`OutProjPrefetch`), against a baseline binary.
# Expects dist/dejavu-bench.xz (the binary under test) and dist/dejavu-bench-base.xz (the
# baseline), both carried. PART picks the steps (default "tune e2e"):
#   tune  every kernel checked against host loops, then the tune rows (bench/device/tune.sh;
#         the attnout rows time each prefetch point in isolation) — tune.json, tune.log;
#   e2e   `dejavu-bench e2e` at 6.7B and 13B, prompt 128, f32 residual + fused attention,
#         token kept on the device, one process per binary in ORDER (default "new base") —
#         e2e-<bin>.json/.log;
#   ncu   the 6.7B step under Nsight Compute with the binary under test
#         (bench/device/ncu-step.sh) — ncu.csv.xz, ncu-summary.md.
set -uo pipefail
source bench/device/setup.sh
if [ -f dist/dejavu-bench-base.xz ] && [ ! -x /tmp/bin/dejavu-bench-base ]; then
    xz -dc dist/dejavu-bench-base.xz > /tmp/bin/dejavu-bench-base && chmod +x /tmp/bin/dejavu-bench-base
fi
export CUBECL_AUTOTUNE_LEVEL=minimal
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for part in ${PART:-tune e2e}; do
case "$part" in
tune)
    LIMIT=${TUNE_LIMIT:-220} bash bench/device/tune.sh > /dev/null 2>&1
    echo "tune: $(grep -cE ' ok$' "$OUT/tune.log") ok lines, $(grep -ciE 'fail' "$OUT/tune.log") failing"
    grep -E "^tune_attention_out_proj" "$OUT/tune.log"
    ;;
e2e)
    for b in ${ORDER:-new base}; do
        bin=dejavu-bench; [ "$b" = base ] && bin=dejavu-bench-base
        # The baseline binary may predate the embedded commit: BASE_COMMIT names it.
        [ "$b" = base ] && export DEJAVU_COMMIT=${BASE_COMMIT:-87dddd7}
        timeout "${E2E_LIMIT:-240}" "$bin" e2e --models "${MODELS:-opt-6.7b,opt-13b}" --prompt-lens 128 --runs 3 --backend cuda --dtype f16 \
            --readback end --breakdown "" --peer-python= --f32-residual --fused-attention --out "$OUT/e2e-$b.json" > "$OUT/e2e-$b.log" 2>&1
        echo "--- $b ($bin, exit $?)"; grep -E "^\| opt" "$OUT/e2e-$b.log" | head -4
        unset DEJAVU_COMMIT
    done
    ;;
ncu)
    EXTRA="--f32-residual --fused-attention" LIMIT=${NCU_LIMIT:-240} bash bench/device/ncu-step.sh > /dev/null 2>&1
    xz -f "$OUT/ncu.csv"; rm -f "$OUT/e2e-ncu.json"
    grep -E "attention_out_proj|^step" "$OUT/ncu-summary.md"
    ;;
esac
done
