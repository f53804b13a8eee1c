#!/usr/bin/env bash
# Device call: a dejavu-bench binary against a baseline, end to end. Expects
# dist/dejavu-bench.xz (the binary under test) and dist/dejavu-bench-base.xz (the
# baseline; BASE_COMMIT names it when it predates the embedded commit), both carried.
# PART picks the steps, in order (default "e2e"):
#   e2e     `dejavu-bench e2e` at MODELS (default 6.7B and 13B), prompt 128, f32 residual +
#           fused attention, token kept on the device, one process per binary in ORDER
#           (default "new base") — e2e-<bin>[-<k>].json/.log, k counting repeats;
#   checks  every kernel of the binary under test checked against host loops at the 6.7B
#           shape — checks.log (~3 min);
#   tune    bench/device/tune.sh with the binary under test — tune.json, tune.log;
#   ncu     the 6.7B step of the binary under test under Nsight Compute
#           (bench/device/ncu-step.sh) — ncu.csv.xz, ncu-summary.md; with NCU_SIDES (say
#           "base new") each side's step instead — ncu-<side>/.
# NEW_ARGS and BASE_ARGS: more e2e arguments for each side (say NEW_ARGS=--fused-norms);
# SAME_BIN=1 runs both sides with the binary under test (a flag against its absence).
set -uo pipefail
source bench/device/setup.sh
export CUBECL_AUTOTUNE_LEVEL=minimal
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for part in ${PART:-e2e}; do
case "$part" in
e2e)
    declare -A seen=()
    for b in ${ORDER:-new base}; do
        seen[$b]=$(( ${seen[$b]:-0} + 1 )); name="e2e-$b"; [ "${seen[$b]}" -gt 1 ] && name="$name-${seen[$b]}"
        bin=dejavu-bench; side_args=${NEW_ARGS:-}
        if [ "$b" = base ]; then
            side_args=${BASE_ARGS:-}
            [ "${SAME_BIN:-0}" = 1 ] || { bin=dejavu-bench-base; [ -n "${BASE_COMMIT:-}" ] && export DEJAVU_COMMIT=$BASE_COMMIT; }
        fi
        timeout "${E2E_LIMIT:-240}" "$bin" e2e --models "${MODELS:-opt-6.7b,opt-13b}" --prompt-lens 128 --runs 3 --backend cuda --dtype f16 \
            --readback end --breakdown "" --peer-python= --f32-residual --fused-attention $side_args --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
        echo "--- $name ($bin, exit $?)"; grep -E "^\| opt" "$OUT/$name.log" | head -4
        unset DEJAVU_COMMIT
    done
    ;;
checks)
    timeout "${CHECK_LIMIT:-180}" dejavu-bench kernels --check --models opt-6.7b --densities 0.1 --ranks 128 --contexts 256 \
        --head-densities 0.5 --calls 20 --samples 3 --peer-python "" --out "$OUT/checks.json" > "$OUT/checks.log" 2>&1
    echo "kernel checks: $(grep -cE ' ok$' "$OUT/checks.log") ok, $(grep -ciE 'fail' "$OUT/checks.log") failing lines"
    grep -E "${CHECK_GREP:-argmax}" "$OUT/checks.log" | head -${CHECK_LINES:-4}
    rm -f "$OUT/checks.json"
    ;;
tune)
    LIMIT=${TUNE_LIMIT:-220} bash bench/device/tune.sh > /dev/null 2>&1
    echo "tune: $(grep -cE ' ok$' "$OUT/tune.log") ok lines, $(grep -ciE 'fail' "$OUT/tune.log") failing"
    ;;
ncu)
    if [ -z "${NCU_SIDES:-}" ]; then
        EXTRA="--f32-residual --fused-attention" LIMIT=${NCU_LIMIT:-240} bash bench/device/ncu-step.sh > /dev/null 2>&1
        xz -f "$OUT/ncu.csv"; rm -f "$OUT/e2e-ncu.json"
        sed -n '/^step 1/,$p' "$OUT/ncu-summary.md" | grep -E "^step|argmax|reduce|cast"
    fi
    for side in ${NCU_SIDES:-}; do
        bin=dejavu-bench; side_args=${NEW_ARGS:-}
        if [ "$side" = base ]; then
            side_args=${BASE_ARGS:-}; [ "${SAME_BIN:-0}" = 1 ] || bin=dejavu-bench-base
        fi
        mkdir -p "$OUT/ncu-$side"
        OUT="$OUT/ncu-$side" BIN=$bin MODELS=${NCU_MODELS:-opt-6.7b} EXTRA="--f32-residual --fused-attention $side_args" LIMIT=${NCU_LIMIT:-150} \
            bash bench/device/ncu-step.sh > /dev/null 2>&1
        xz -f "$OUT/ncu-$side/ncu.csv"
        echo "--- ncu $side ($bin $side_args)"; sed -n '/^step 1/,$p' "$OUT/ncu-$side/ncu-summary.md" | head -14
    done
    ;;
esac
done
