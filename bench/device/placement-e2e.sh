#!/usr/bin/env bash
# Device call: the 6.7B decode step (dense and sparse rows, `--fused-norms
# --deferred-norms`) in one process per entry of ORDER (default "plain apart plain apart
# plain apart together"), with bench/device/placement.py watching where the process's
# threads run: `plain` as the scheduler places them, `apart` the model's thread on CPU A and
# CubeCL's device thread on CPU B (two cores; A and B default to the first two CPUs past
# cpu1 with different core ids), `together` both on CPU A. Each process's log, JSON, thread
# samples (.threads) and the guest's /proc/stat before and after (.stat) go to $OUT; the
# table at the end is placement.py's summary. The machine's CPU topology: cpus.txt.
set -uo pipefail
source bench/device/setup.sh
export CUBECL_AUTOTUNE_LEVEL=minimal
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
{
    nproc; lscpu
    for c in /sys/devices/system/cpu/cpu[0-9]*; do
        echo "$(basename "$c") core $(cat "$c/topology/core_id") siblings $(cat "$c/topology/thread_siblings_list") package $(cat "$c/topology/physical_package_id")"
    done
} > "$OUT/cpus.txt" 2>&1
# A and B: CPUs past cpu1 on different cores (siblings of A skipped).
if [ -z "${A:-}" ] || [ -z "${B:-}" ]; then
    read -r A B < <(python3 - <<'PY'
import glob, re
cpus = sorted(int(re.search(r"cpu(\d+)$", p).group(1)) for p in glob.glob("/sys/devices/system/cpu/cpu[0-9]*"))
core = {c: open(f"/sys/devices/system/cpu/cpu{c}/topology/core_id").read().strip() + "/" + open(f"/sys/devices/system/cpu/cpu{c}/topology/physical_package_id").read().strip() for c in cpus}
pick = []
for c in cpus:
    if c >= 2 and all(core[c] != core[p] for p in pick):
        pick.append(c)
print(pick[0], pick[1])
PY
)
fi
echo "A=$A B=$B"; grep -E "^(Thread|Core|Socket|Model name|CPU\(s\))" "$OUT/cpus.txt"
declare -A seen=()
for mode in ${ORDER:-plain apart plain apart plain apart together}; do
    seen[$mode]=$(( ${seen[$mode]:-0} + 1 )); name="e2e-$mode-${seen[$mode]}"
    head -1 /proc/stat > "$OUT/$name.stat"
    timeout "${E2E_LIMIT:-150}" dejavu-bench e2e --models opt-6.7b --prompt-lens 128 --runs 3 --backend cuda --dtype f16 \
        --readback end --breakdown "" --peer-python= --f32-residual --fused-attention --fused-norms --deferred-norms \
        --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1 &
    pid=$!
    # the watcher follows the bench process itself (timeout's child)
    sleep 0.3; bench=$(pgrep -P $pid -x dejavu-bench || echo $pid)
    python3 bench/device/placement.py watch "$bench" "$OUT/$name.threads" "$mode" "$A" "$B" &
    wait $pid; echo "--- $name (exit $?)"
    head -1 /proc/stat >> "$OUT/$name.stat"
    wait
    grep -E "^\| opt-6.7b \| 128 \| sparse" "$OUT/$name.log" | head -1
done
python3 bench/device/placement.py summary "$OUT" | tee "$OUT/placement.md"
