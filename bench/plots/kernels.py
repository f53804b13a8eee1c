#!/usr/bin/env python3
"""PNG of `dejavu-bench kernels` JSON: GPU time per call against density, one panel per
model shape: our sparse MLP, PyTorch's dense MLP (cuBLAS), index_select + GEMV, and the
contiguous slice of the same rows (the ceiling a gather can reach). With an Nsight
Compute summary (bench/device/ncu_summary.py), also our kernels' own device time.

    python3 bench/plots/kernels.py kernels-<commit>.json [kernels-ncu-<commit>.json] out.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    src = sys.argv[1]
    ncu = json.load(open(sys.argv[2]))["rows"] if len(sys.argv) > 3 else []
    dst = sys.argv[-1] if len(sys.argv) > 2 else src.replace(".json", ".png")
    data = json.load(open(src))
    rows = data["rows"]
    peer = (data.get("peer") or {}).get("rows", [])
    models = list(dict.fromkeys(r["model"] for r in rows if r["op"] == "ours_sparse_mlp"))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        def series(source, op):
            key = "kernel_us" if source is ncu else "gpu_us"
            pts = sorted((r["density"], r[key]) for r in source
                         if r["model"] == model and r["op"] == op and r.get("density") is not None)
            return [p for p, _ in pts], [t for _, t in pts]

        for source, op, label, style in [
            (ncu, "ours_sparse_mlp", "ours: sparse MLP, kernel time (ncu)", "o-"),
            (rows, "ours_sparse_mlp", "ours: sparse MLP, two-pass fc2 (primed GPU time)", "o:"),
            (rows, "ours_sparse_mlp_accumulate", "ours: sparse MLP into f32, atomic fc2 (primed GPU time)", "d-"),
            (peer, "torch_slice_mlp", "torch: contiguous slice (ceiling)", "s--"),
            (peer, "torch_index_select_mlp", "torch: index_select + GEMV", "^:"),
        ]:
            x, y = series(source, op)
            if x:
                ax.plot(x, y, style, label=label)
        dense = [r["gpu_us"] for r in peer if r["model"] == model and r["op"] == "torch_dense_mlp"]
        if dense:
            ax.axhline(dense[0], color="k", lw=1, label="torch: dense MLP (cuBLAS)")
        ours_dense = [r["gpu_us"] for r in rows if r["model"] == model and r["op"] == "ours_dense_mlp"]
        if ours_dense:
            ax.axhline(ours_dense[0], color="gray", lw=1, ls="--", label="ours: dense MLP (our GEMV)")
        ax.set_title(f"{model} MLP, batch 1, {data['dtype']}")
        ax.set_xlabel("density (fraction of ffn neurons)")
        ax.set_ylabel("GPU µs per call")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{data['device']} · commit {data['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print("wrote", dst)


if __name__ == "__main__":
    main()
