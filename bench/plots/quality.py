#!/usr/bin/env python3
"""PNG of `dejavu-bench quality` JSON (full or .partial): perplexity relative to dense
against what each configuration kept — MLP neurons (the MLP sweep, the oracle MLP, the
named operating points) and attention heads (the attention sweep) — one line per text.
Rows of several files are merged; each file's rows are relative to its own dense row.

    python3 bench/plots/quality.py out.png quality-a.json [quality-b.json ...]
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TEXTS = ["WikiText-2 test", "corpus valid"]


def main():
    dst, sources = sys.argv[1], sys.argv[2:]
    rows = {}
    for src in sources:
        for r in json.load(open(src))["rows"]:
            rows.setdefault(r["name"], r)  # the first file's row wins
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = [
        (axes[0], "kept_mlp_density", ["mlp", "oracle", "point"], "MLP neurons kept per token (mean over all 12 layers)"),
        (axes[1], "kept_attention_density", ["attention", "point"], "attention heads kept per token (mean over all 12 layers)"),
    ]
    styles = {"mlp": "o-", "oracle": "s--", "attention": "o-", "point": "^"}
    for ax, key, kinds, label in panels:
        for t, text in enumerate(TEXTS):
            for kind in kinds:
                pts = sorted((r[key], 100 * r["relative"][t], r["name"]) for r in rows.values() if r["kind"] == kind)
                if not pts:
                    continue
                xs, ys, names = zip(*pts)
                ax.plot([100 * x for x in xs], ys, styles[kind], label=f"{kind} — {text}", color=f"C{t}", alpha=0.9 if kind != "point" else 0.6)
                if kind == "point":
                    for x, y, n in pts:
                        ax.annotate(n, (100 * x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        ax.set_xlabel(label)
        ax.set_ylabel("perplexity vs dense (%)")
        ax.set_yscale("symlog", linthresh=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("opt-mini, every token sparse, bundled predictors (dotted: +1%)")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main()
