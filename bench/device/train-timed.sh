#!/usr/bin/env bash
# Device call: issue 3's timing and rank sweep on the H100, self-contained (the machine is
# released 30 s after a call, so the recording cannot wait for a second call).
#   1. record opt-mini's 400k + 20k rows and fit every layer's MLP and attention predictors
#      at the default rank 128 — the "record + fit all of opt-mini" time;
#   2. with the time left (of TOTAL s), fit ranks 32, 64 and 256 too on the same rows
#      (--resume keeps rank 128's results), so the report has recall and density against rank.
#      TIMED=0 skips step 1's fit; SWEEP_RANKS picks the ranks (default 32,64,128,256).
# Expects dist/dejavu-train.xz, dist/corpus-head.txt.xz (see train.sh) and a carried
# target/autotune. Writes under $OUT: train-timed.log, recording.json, fit-report-r128.json,
# fit-report-sweep.json, results.tgz (every rank's result.json and the training logs) and
# autotune.tgz.
set -uo pipefail
source bench/device/setup.sh
exec > >(tee -a "$OUT/train-timed.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
rec=/tmp/rec
pred=/tmp/pred
rm -rf "$rec" "$pred"
start=$(date +%s.%N)
time timeout "${RECORD_LIMIT:-200}" dejavu-train record --backend cuda --dtype f32 \
    --text dist/corpus-head.txt.xz --out "$rec" --rows 400000 --valid-rows 20000 --length-bucket 2048
recorded=$(date +%s.%N)
cp "$rec/recording.json" "$OUT/" 2>/dev/null
if [ "${TIMED:-1}" = 1 ]; then
    time timeout "${FIT_LIMIT:-240}" dejavu-train fit --backend cuda --recording "$rec" --out "$pred" --ranks 128
    fitted=$(date +%s.%N)
    cp "$pred/fit-report.json" "$OUT/fit-report-r128.json" 2>/dev/null
    python3 -c "import sys; a, b, c = map(float, sys.argv[1:]); print(f'TIMING record {b - a:.1f} s, fit (rank 128, MLP and attention) {c - b:.1f} s, record + fit {c - a:.1f} s')" "$start" "$recorded" "$fitted"
fi
# The sweep gets what is left of TOTAL s (default 560: the device's 600 s a call, less packing).
left=$(python3 -c "import sys, time; print(max(10, int(float(sys.argv[1]) - (time.time() - float(sys.argv[2])))))" "${TOTAL:-560}" "$start")
echo "rank sweep: $left s"
time timeout "$left" dejavu-train fit --backend cuda --recording "$rec" --out "$pred" \
    --ranks "${SWEEP_RANKS:-32,64,128,256}" --resume
cp "$pred/fit-report.json" "$OUT/fit-report-sweep.json" 2>/dev/null
tar czf "$OUT/results.tgz" -C "$pred" $(cd "$pred" && ls training/*/result.json training/*/experiment.log 2>/dev/null) 2>/dev/null
tar czf "$OUT/autotune.tgz" target/autotune 2>/dev/null
ls -la "$OUT"
