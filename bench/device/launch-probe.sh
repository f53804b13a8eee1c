#!/usr/bin/env bash
# Device call: what a CubeCL launch costs the host, by what it carries (dejavu-bench
# launch), PyTorch's launch for comparison, and the 6.7B-shape decode step's GPU time
# with no launch gaps against its host-bound time (dejavu-bench e2e's profile).
set -uo pipefail
source bench/device/setup.sh
exec > >(tee -a "$OUT/launch-probe.log") 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
dejavu-bench launch --out "$OUT/launch.json"
python3 bench/peers/torch_launch.py --json "$OUT/torch-launch.json"
timeout 420 dejavu-bench e2e --models "${MODELS:-opt-6.7b}" --prompt-lens 128 --runs 3 --peer-python "" \
  --breakdown "" --out "$OUT/e2e.json" 2>&1 | grep -v "^\s*$"
tar czf "$OUT/autotune.tgz" target/autotune 2>/dev/null || true
