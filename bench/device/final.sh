#!/usr/bin/env bash
# (Run at commit 082d37f, when `--backend cuda` meant the fused backend, now `cuda-fused`.)
# Device call: CUDA f16 correctness (perplexity of the first 4096 WikiText-2 tokens, to
# compare with CPU f32) and the OPT-6.7B dense decode benchmark against transformers.
set -uo pipefail
mkdir -p /tmp/bin && for b in dejavu dejavu-bench; do xz -dc dist/$b.xz > /tmp/bin/$b; chmod +x /tmp/bin/$b; done
export PATH=/tmp/bin:$PATH PYTHONUNBUFFERED=1
export LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
exec > >(tee -a "$OUT/final.log") 2>&1
time timeout 60 python3 bench/peers/hf_decode.py --models opt-6.7b --runs 5 --json "$OUT/hf.json"
time timeout 170 dejavu perplexity dist/wt-check.txt --max-tokens 4096 --backend cuda --dtype f16 --json "$OUT/ppl-check-cuda-f16.json"
time timeout 320 dejavu-bench dense --models opt-6.7b --runs 5 --backend cuda --dtype f16 \
    --peer-json "$OUT/hf.json" --out "$OUT/dense.json"
