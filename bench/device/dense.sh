#!/usr/bin/env bash
# (Run at commit 082d37f, when `--backend cuda` meant the fused backend, now `cuda-fused`.)
# One device call: batch-1 dense decode, transformers (fp16, eager) first, then ours
# (`dejavu-bench dense`, CUDA f16) on opt-mini, OPT-1.3B and OPT-6.7B shapes, with a
# perplexity check of opt-mini on the first 4096 WikiText-2 tokens. Expects
# dist/dejavu-bench.gz and dist/wt-small.txt (carried). Writes under $OUT.
set -uo pipefail
mkdir -p /tmp/bin && gunzip -c dist/dejavu-bench.gz > /tmp/bin/dejavu-bench && chmod +x /tmp/bin/dejavu-bench
export PATH=/tmp/bin:$PATH PYTHONUNBUFFERED=1
export LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
exec > >(tee -a "$OUT/dense.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
models=${MODELS:-opt-mini,opt-1.3b,opt-6.7b}
time timeout 170 python3 bench/peers/hf_decode.py --models "$models" --runs "${RUNS:-5}" --json "$OUT/hf.json"
# Minimal autotuning keeps the first-call compile and tuning inside the call's time limit.
export CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal}
time timeout 400 dejavu-bench dense --models "$models" --runs "${RUNS:-5}" --backend cuda --dtype f16 \
    --peer-json "$OUT/hf.json" --check-text dist/wt-small.txt --check-tokens 4096 --out "$OUT/dense.json"
