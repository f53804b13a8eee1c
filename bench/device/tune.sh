#!/usr/bin/env bash
# Device call: grid-shape and kernel variants of the MLP kernels at one shape (first
# checked against host loops, outputs poisoned), then the tune rows sorted by time.
# Expects dist/dejavu-bench.xz (carried). Writes $OUT/tune.json and $OUT/tune.log.
set -uo pipefail
source bench/device/setup.sh
exec > >(tee -a "$OUT/tune.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
time timeout "${LIMIT:-500}" dejavu-bench kernels --check --tune --models "${MODELS:-opt-6.7b}" --densities 0.1 \
  --contexts --ranks 128 --peer-python= --out "$OUT/tune.json"
python3 - "$OUT/tune.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
for r in sorted((r for r in rows if r["op"].startswith("tune_")), key=lambda r: (r["op"].split("_")[1], r["gpu_us"])):
    print(f'{r["op"]:<44} {r["gpu_us"]:8.2f} us {r["gpu_gbs"]:7.0f} GB/s')
PY
