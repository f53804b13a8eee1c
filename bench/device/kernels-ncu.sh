#!/usr/bin/env bash
# Kernel-only device times of our kernels under Nsight Compute, per model shape, all
# densities (bench/device/ncu_summary.py attributes kernels to operations). Expects
# dist/dejavu-bench.xz. Writes $OUT/ncu-<model>.csv and $OUT/ncu-kernels.json.
set -uo pipefail
source bench/device/setup.sh
DENS=${DENS:-0.05,0.1,0.25,0.5,0.8,1.0}
for spec in opt-6.7b:4096 opt-13b:5120 opt-30b:7168; do
    m=${spec%%:*}; d=${spec##*:}
    timeout 150 /usr/local/cuda/bin/ncu --kernel-name "regex:(?i)(rows|sum_partials|select|combine)" --launch-count 1000 \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,launch__grid_size --csv --page raw \
        /tmp/bin/dejavu-bench kernels --models $m --densities $DENS --ranks 128 --calls 3 --samples 1 \
        --rotate-mb 64 --primer-mb 64 --contexts 128,512,1024 --head-densities 0.5,1.0 --peer-python "" --out $OUT/ncu-run-$m.json > $OUT/ncu-$m.csv 2> $OUT/ncu-$m.err
    python3 bench/device/ncu_summary.py $OUT/ncu-$m.csv $m $d $((4 * d)) $DENS 128 $OUT/ncu-$m.json 128,512,1024 0.5,1.0
done
python3 -c "
import json,sys; rows=[]
for m in ['opt-6.7b','opt-13b','opt-30b']:
    try: rows += json.load(open('$OUT/ncu-%s.json' % m))
    except Exception as e: print('missing', m, e)
json.dump({'tool': 'Nsight Compute (ncu), gpu__time_duration.sum, caches flushed per kernel', 'rows': rows}, open('$OUT/ncu-kernels.json','w'), indent=1)"
