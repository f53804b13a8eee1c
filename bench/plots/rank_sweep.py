#!/usr/bin/env python3
"""PNG of a predictor rank sweep: per layer, the density each trained predictor needs for
its calibrated recall (by threshold), as a multiple of the true density, one line per
(lookahead, rank) — from `dejavu-train fit`'s per-run `result.json` files (a list of
per-layer results), labelled on the command line.

    python3 bench/plots/rank_sweep.py out.png LABEL=result.json [LABEL=result.json ...]
"""
import json
import sys

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    if len(sys.argv) < 3 or any("=" not in a for a in sys.argv[2:]):
        sys.exit(__doc__)
    dst, series = sys.argv[1], [a.split("=", 1) for a in sys.argv[2:]]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    kinds = set()
    for label, path in series:
        results = json.load(open(path))
        kinds.update(r["kind"] for r in results)
        layers = [r["layer"] for r in results]
        ratio = [r["calibration"]["density_at_threshold"] / r["calibration"]["true_density"] for r in results]
        style = "--" if "lookahead 0" in label else "-"
        ax.plot(layers, ratio, style, marker="o", label=label)
    ax.axhline(2.0, color="grey", linewidth=0.8, linestyle=":")
    ax.text(ax.get_xlim()[0], 2.02, " goal: 2× the true density", color="grey", fontsize=8, va="bottom")
    ax.set_xlabel("layer")
    ax.set_ylabel("selected density / true density\n(at the calibrated recall, by threshold)")
    ax.set_title(f"{'/'.join(sorted(kinds))} predictors by rank and lookahead")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(dst, dpi=120)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
