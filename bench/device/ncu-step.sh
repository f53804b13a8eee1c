#!/usr/bin/env bash
# Device call: every kernel's GPU time (and DRAM bytes) in one 6.7B decode step, dense then
# sparse, under Nsight Compute — which kernels a decode step spends its GPU time in. Only
# the step that e2e's profile runs inside its capture window (DEJAVU_NCU_CAPTURE) is
# profiled; the peer is skipped.
# Writes under $OUT: ncu.csv (one row per kernel launch), ncu-summary.md (per kernel, per
# step: bench/device/ncu_summary.py), ncu-step.log. TOKENS must cover the profile runs (33).
# EXTRA: more e2e arguments (say --f32-residual). NCU_CACHE: Nsight Compute's cache control,
# "all" (default: caches flushed before each kernel) or "none" (each kernel finds what the
# kernels before it left in L2, as in a decode step). BIN: the binary (default dejavu-bench;
# setup.sh puts /tmp/bin first on PATH, so another binary must be named here).
set -uo pipefail
source bench/device/setup.sh
exec > >(tee -a "$OUT/ncu-step.log") 2>&1
export CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal}
echo "ncu: $ncu"
DEJAVU_NCU_CAPTURE=1 timeout "${LIMIT:-300}" "$ncu" --clock-control none --cache-control "${NCU_CACHE:-all}" --profile-from-start off \
  --metrics gpu__time_duration.sum,dram__bytes_read.sum,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active \
  --export "$OUT/prof" --force-overwrite \
  "${BIN:-dejavu-bench}" e2e --models "${MODELS:-opt-6.7b}" --prompt-lens 128 --new-tokens "${TOKENS:-40}" --runs 1 \
  --profile true --breakdown "" --peer-python "" ${EXTRA:-} --out "$OUT/e2e-ncu.json" | tail -20
"$ncu" --import "$OUT/prof.ncu-rep" --csv --page raw \
  --metrics gpu__time_duration.sum,dram__bytes_read.sum,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active > "$OUT/ncu.csv"
rm -f "$OUT/prof.ncu-rep"
wc -l "$OUT/ncu.csv"
python3 bench/device/ncu_summary.py "$OUT/ncu.csv" | tee "$OUT/ncu-summary.md"
