#!/usr/bin/env bash
# Device call: what a CubeCL launch costs the host, by what it carries (dejavu-bench
# launch), PyTorch's launch for comparison, the kernels checked against host loops at the
# 6.7B shape (norm_predict and the residual transposed GEMV included), then the
# end-to-end benchmark (transformers in the same call) with each step's profile and its GPU
# time without launch gaps; opt-mini first, whose row checks kernel decode against Burn's
# tensor-op decode (32 greedy tokens). MODELS (default opt-mini,opt-6.7b) and LIMIT override; CHECK=0 skips the
# kernel checks. Writes under $OUT: launch.json, torch-launch.json, kernels.json, hf.json,
# e2e.json, launch-probe.log, autotune.tgz.
set -uo pipefail
source bench/device/setup.sh
exec > >(tee -a "$OUT/launch-probe.log") 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
models=${MODELS:-opt-mini,opt-6.7b}
export CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal}
dejavu-bench launch --out "$OUT/launch.json"
python3 bench/peers/torch_launch.py --json "$OUT/torch-launch.json"
if [ "${CHECK:-1}" = 1 ]; then
  timeout 150 dejavu-bench kernels --check --models opt-6.7b --densities 0.1 --ranks 128 --contexts 512 \
    --head-densities 0.5 --calls 20 --samples 3 --peer-python "" --out "$OUT/kernels.json" | tail -15
fi
timeout 200 python3 bench/peers/hf_decode.py --models "$models" --prompt-lens 128 --new-tokens 128 --runs 3 \
  --json "$OUT/hf.json"
timeout "${LIMIT:-300}" dejavu-bench e2e --models "$models" --prompt-lens 128 --runs 3 --backend cuda --dtype f16 \
  --peer-json "$OUT/hf.json" --opt-mini-points threshold --out "$OUT/e2e.json"
tar czf "$OUT/autotune.tgz" target/autotune 2>/dev/null || true
