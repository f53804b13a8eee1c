#!/usr/bin/env bash
# Device call: why is CUDA decode slow and CUDA f16 wrong? opt-mini on the unfused (`cuda`) and
# fused (`cuda-fused`) CUDA backends, f16 and f32, with CubeCL's compile/autotune log, and a perplexity
# check on the first 4096 tokens of WikiText-2 (CPU f32 gives the reference).
set -uo pipefail
mkdir -p /tmp/bin && gunzip -c dist/dejavu-bench.gz > /tmp/bin/dejavu-bench && chmod +x /tmp/bin/dejavu-bench
export PATH=/tmp/bin:$PATH LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
exec > >(tee -a "$OUT/diagnose.log") 2>&1
for backend in cuda cuda-fused; do for dtype in f16 f32; do
  echo "== $backend $dtype"
  CUBECL_DEBUG_LOG=/tmp/cubecl-$backend-$dtype.log timeout 150 dejavu-bench dense --models opt-mini \
    --backend $backend --dtype $dtype --runs 3 --new-tokens 64 --peer-python "" \
    --check-text dist/wt-small.txt --check-tokens 4096 --out "$OUT/diag-$backend-$dtype.json" | tail -3
  l=/tmp/cubecl-$backend-$dtype.log; echo "log lines $(wc -l < $l), autotune lines $(grep -ci autotun $l), compile lines $(grep -ci compil $l)"
done; done
tar czf "$OUT/cubecl-logs.tgz" -C /tmp $(cd /tmp && ls cubecl-*.log)
