#!/usr/bin/env bash
# Device call: the sparse MLP kernels. Checks every kernel against host loops at the
# OPT-6.7B/13B/30B MLP shapes (outputs poisoned), times grid-shape variants, then times
# ours and the PyTorch peers (bench/peers/torch_kernels.py, run by the bench) across
# densities. Expects dist/dejavu-bench.xz (carried). Writes under $OUT.
set -uo pipefail
source bench/device/setup.sh
exec > >(tee -a "$OUT/kernels.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
time timeout "${LIMIT:-540}" dejavu-bench kernels --check --tune ${EXTRA:-} --out "$OUT/kernels.json"
