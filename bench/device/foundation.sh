#!/usr/bin/env bash
# One device call for the foundation issue: the CUDA build of `dejavu` generates and
# measures perplexity on the bundled opt-mini (CUDA f16 and f32), transformers
# computes the reference perplexity, and the opt-micro loader fixture is made with torch.
# Expects dist/dejavu.gz and dist/wikitext2-test.txt (carried; LF line endings). The CPU f32
# reference runs on the development machine (see README). Writes under $OUT.
set -uo pipefail
mkdir -p /tmp/bin && gunzip -c dist/dejavu.gz > /tmp/bin/dejavu && chmod +x /tmp/bin/dejavu
export PATH=/tmp/bin:$PATH PYTHONUNBUFFERED=1
export LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
log=$OUT/foundation.log
exec > >(tee -a "$log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
text=dist/wikitext2-test.txt

python3 model/tests/fixtures/make_opt_micro.py "$OUT/opt-micro.tar"

# Sequential: a CPU job beside the GPU work starves the CUDA host thread.
t() { timeout "$@"; }
time t 150 dejavu generate "The capital of France is" --backend cuda --dtype f16 --max-new-tokens 64
time t 200 dejavu perplexity $text --backend cuda --dtype f16 --json "$OUT/ppl-cuda-f16.json"
time t 200 dejavu perplexity $text --backend cuda --dtype f32 --json "$OUT/ppl-cuda-f32.json"
time t 120 python3 bench/peers/hf_perplexity.py --model assets/opt-mini --file $text --json "$OUT/ppl-hf-f32.json"
python3 - "$OUT" <<'PY'
import json, sys, os
out = sys.argv[1]
rows = []
for name in ["ppl-cuda-f16", "ppl-cuda-f32", "ppl-hf-f32"]:
    p = os.path.join(out, name + ".json")
    if not os.path.exists(p):
        rows.append((name, None)); continue
    d = json.load(open(p))
    rows.append((name, d["report"]["perplexity"] if "report" in d else d["perplexity"]))
ref = dict(rows).get("ppl-hf-f32")
print("| run | perplexity | vs transformers f32 |")
for name, v in rows:
    rel = f"{(v / ref - 1) * 100:+.3f}%" if v and ref else "-"
    print(f"| {name} | {v} | {rel} |")
PY
