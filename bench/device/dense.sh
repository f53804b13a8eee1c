#!/usr/bin/env bash
# One device call: `dejavu-bench dense` (ours vs transformers, batch-1 decode) on the
# shapes the foundation issue names. Expects dist/dejavu-bench.gz (carried).
set -uo pipefail
mkdir -p /tmp/bin && gunzip -c dist/dejavu-bench.gz > /tmp/bin/dejavu-bench && chmod +x /tmp/bin/dejavu-bench
export PATH=/tmp/bin:$PATH PYTHONUNBUFFERED=1
export LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
exec > >(tee -a "$OUT/dense.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
DEJAVU_COMMIT=${DEJAVU_COMMIT:-unknown} timeout 570 dejavu-bench dense \
    --models "${MODELS:-opt-mini,opt-1.3b,opt-6.7b}" --runs "${RUNS:-5}" --out "$OUT/dense.json"
