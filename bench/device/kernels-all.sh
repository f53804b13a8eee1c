#!/usr/bin/env bash
# One device call: `dejavu-bench kernels --check --tune` (with the PyTorch peer), then the
# Nsight Compute kernel times (kernels-ncu.sh). Writes under $OUT.
set -uo pipefail
LIMIT=${LIMIT:-330} bash bench/device/kernels.sh
bash bench/device/kernels-ncu.sh 2>&1 | tee "$OUT/ncu-summary.txt"
