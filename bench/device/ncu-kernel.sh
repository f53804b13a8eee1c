#!/usr/bin/env bash
# Device call: Nsight Compute's detail sections (speed of light, occupancy, launch, the
# scheduler's and warps' stall statistics, memory workload) for COUNT (default 2)
# launches of the kernels matching KERNEL (a regex, default the one-launch attention with
# out_proj) inside one 6.7B decode step of `dejavu-bench e2e` (its capture window, as
# ncu-step.sh), after SKIP (default 10) matching launches. EXTRA: more e2e arguments
# (default --f32-residual --fused-attention). Writes $OUT/ncu-kernel.txt (the details
# page), $OUT/ncu-kernel.log and $OUT/e2e-ncu.json (device, binary commit; its timings
# are under the profiler and mean nothing).
set -uo pipefail
source bench/device/setup.sh
exec > >(tee -a "$OUT/ncu-kernel.log") 2>&1
export CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal}
DEJAVU_NCU_CAPTURE=1 timeout "${LIMIT:-300}" "$ncu" --clock-control none --profile-from-start off \
  -k "regex:${KERNEL:-attention_out_proj}" --launch-skip "${SKIP:-10}" --launch-count "${COUNT:-2}" \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats \
  --section WarpStateStats --section MemoryWorkloadAnalysis --section SourceCounters \
  --export "$OUT/kernel" --force-overwrite \
  dejavu-bench e2e --models opt-6.7b --prompt-lens 128 --new-tokens 40 --runs 1 \
  --profile true --breakdown "" --peer-python "" ${EXTRA---f32-residual --fused-attention} --out "$OUT/e2e-ncu.json" | tail -3
"$ncu" --import "$OUT/kernel.ncu-rep" --page details > "$OUT/ncu-kernel.txt"
rm -f "$OUT/kernel.ncu-rep"
wc -l "$OUT/ncu-kernel.txt"
