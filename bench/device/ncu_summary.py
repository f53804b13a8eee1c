#!/usr/bin/env python3
"""Per-operation kernel durations from an Nsight Compute CSV of `dejavu-bench kernels`
(bench/device/kernels-ncu.sh). ncu serialises kernels and flushes caches before each, so
these are cold-L2 device times of each kernel alone, with no launch gaps or host costs.

Kernels are attributed to operations by their launch order, which the benchmark fixes:
every timed operation is called 9 times with --calls 3 --samples 1 (3 warm-up, 3 stream,
3 primed), dense fc1, dense fc2, dense MLP, then per density gathered fc1, gathered fc2ᵀ
(partial + sum kernels) and the sparse MLP (all three), then selection and the predictor
(rank 128: GEMV, partial, sum, selection). Kernel names are checked against that
schedule. A call's time is the sum of its kernels; median over calls.

    python3 ncu_summary.py ncu.csv MODEL D FFN DENSITIES RANKS out.json [CONTEXTS HEAD_DENSITIES]

Then, per context length and head density, the selected-head attention: QKV (GEMV),
attention, out_proj (partial + sum), and the three together.
"""
import csv
import json
import statistics
import sys

CALLS = 9
G, P, S, SEL, A, C = ("rows_gemv", "rows_transposed_gemv_partial", "sum_partials", "select_above_threshold",
                      "selected_heads_attention", "combine_attention_splits")
ATTENTION_CHUNK = 128  # kernels/src/cube/launch.rs: longer contexts add the combine kernel


def main():
    path, model, d, ffn, densities, ranks, out = sys.argv[1:8]
    densities = [float(x) for x in densities.split(",")]
    ranks = [int(x) for x in ranks.split(",")]
    rows = [r for r in csv.reader(open(path)) if len(r) > 5]
    ix = {k: i for i, k in enumerate(rows[0])}
    num = lambda s: float(s.replace(",", ""))
    launches = [(r[ix["Kernel Name"]], num(r[ix["gpu__time_duration.sum"]]) / 1e3, num(r[ix["dram__bytes_read.sum"]]))
                for r in rows[2:]]
    schedule = [("dense_fc1", None, [G]), ("dense_fc2", None, [G]), ("dense_mlp", None, [G, G])]
    for p in densities:
        schedule += [("fc1_gather", p, [G]), ("fc2t_gather", p, [P, S]), ("sparse_mlp", p, [G, P, S])]
    schedule += [("select", 0.1, [SEL])]
    schedule += [(f"predictor_select_r{r}", None, [G, P, S, SEL]) for r in ranks]
    if len(sys.argv) > 9:
        for ctx in [int(c) for c in sys.argv[8].split(",")]:
            core = [A, C] if ctx > ATTENTION_CHUNK else [A]
            for p in [float(x) for x in sys.argv[9].split(",")]:
                schedule += [(f"attn_qkv_ctx{ctx}", p, [G]), (f"attn_core_ctx{ctx}", p, core),
                             (f"attn_out_ctx{ctx}", p, [P, S]), (f"attention_ctx{ctx}", p, [G, *core, P, S])]
    result, i = [], 0
    for op, p, kernels in schedule:
        if i + CALLS * len(kernels) > len(launches):
            print(f"{model}: the capture ends before {op} {p} (ncu --launch-count); not attributed")
            break
        calls = []
        for _ in range(CALLS):
            group = launches[i:i + len(kernels)]
            for (name, _, _), want in zip(group, kernels):
                if not name.startswith(want):
                    raise SystemExit(f"{model}: launch {i} is {name}, the schedule expects {want} ({op} {p})")
            calls.append(group)
            i += len(kernels)
        per_kernel = [statistics.median(c[j][1] for c in calls) for j in range(len(kernels))]
        t = statistics.median(sum(k[1] for k in c) for c in calls)
        nbytes = statistics.median(sum(k[2] for k in c) for c in calls)
        result.append({"model": model, "op": "ours_" + op, "density": p, "kernel_us": t, "per_kernel_us": per_kernel,
                       "kernels": kernels, "dram_bytes_read": nbytes, "dram_gbs": nbytes / t / 1e3})
        print(f"{model:<9} {op:<24} {str(p):>5} {t:8.2f} us {per_kernel}  {nbytes / t / 1e3:6.0f} GB/s")
    json.dump(result, open(out, "w"), indent=1)


if __name__ == "__main__":
    main()
