#!/usr/bin/env bash
# Device call: what makes some timed runs of the 6.7B sparse decode slower than others.
# nvidia-smi logs the GPU's clocks, power, temperature and throttle reasons every 50 ms
# while one dejavu-bench e2e process per entry of ORDER (default "new new new"; "base" runs
# the carried dist/dejavu-bench-base.xz) runs RUNS (default 9) timed runs, every run
# recording its start and the process's context switches (runs_context; binaries before
# 7d2cb12 record no context). bench/device/noise.py lines each run up with the log.
# MODELS: the shapes each process runs (default opt-6.7b). EXTRA: more e2e arguments for
# every process; NEW_ARGS and BASE_ARGS for each side's;
# SAME_BIN=1 runs both sides with the binary under test (a flag against its absence); any
# other side name S runs the binary under test with the arguments in ARGS_S (ORDER="new f16p
# ARGS_f16p=--predictors-in-model-dtype": a flag beside the default in one call);
# HOST_PROFILE=1 (binaries built with the host-profile feature) samples the host in each
# process, into hp-<k>-<side>.txt(.folded).
# Writes under $OUT: smi.csv, clock.txt (the host's Unix ms and time zone when the log
# started), e2e-<k>-<side>.json/.log.
set -uo pipefail
source bench/device/setup.sh
export CUBECL_AUTOTUNE_LEVEL=minimal
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
{ date +%s%3N; date +%Z; } > "$OUT/clock.txt"
# Newer drivers name the throttle reasons clock event reasons.
fields=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,clocks_event_reasons.active
nvidia-smi --query-gpu=$fields --format=csv > /dev/null 2>&1 || fields=${fields/clocks_event_reasons/clocks_throttle_reasons}
nvidia-smi --query-gpu=$fields --format=csv,nounits -lms 50 > "$OUT/smi.csv" 2>&1 &
smi=$!
k=0
for side in ${ORDER:-new new new}; do
    k=$((k + 1)); bin=dejavu-bench; side_args=${NEW_ARGS:-}
    if [ "$side" = base ]; then
        side_args=${BASE_ARGS:-}; [ "${SAME_BIN:-0}" = 1 ] || bin=dejavu-bench-base
    elif [ "$side" != new ]; then
        var=ARGS_$side; side_args=${!var:-}
    fi
    timeout "${E2E_LIMIT:-150}" "$bin" e2e --models "${MODELS:-opt-6.7b}" --prompt-lens 128 --runs "${RUNS:-9}" --backend cuda --dtype f16 \
        --readback end --breakdown "" --peer-python= --f32-residual --fused-attention --fused-norms --deferred-norms \
        ${EXTRA:-} $side_args ${HOST_PROFILE:+--host-profile "$OUT/hp-$k-$side.txt"} \
        --out "$OUT/e2e-$k-$side.json" > "$OUT/e2e-$k-$side.log" 2>&1
    echo "--- e2e-$k-$side (exit $?)"; grep -E "^\| opt-[0-9.]+b \| 128 \| (sparse|.*host alone)" "$OUT/e2e-$k-$side.log" | head -3
done
kill "$smi"
python3 bench/device/noise.py "$OUT" | tee "$OUT/noise.md"
