#!/usr/bin/env python3
"""PNG of a `dejavu-bench e2e` JSON: (left) ms per token at the first prompt length by
model and configuration — ours dense, ours sparse, transformers, and each configuration's
bytes floor; (right) ms per token against prompt length.

    python3 bench/plots/e2e.py out.png e2e-a.json [e2e-b.json ...]

Rows of several files (separate device calls, each with its own transformers run) are
merged; each model's numbers come from one file.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    dst, sources = sys.argv[1], sys.argv[2:]
    files = [json.load(open(src)) for src in sources]
    j = files[0]
    rows = [r for f in files for r in f["rows"]]
    summary = [s for f in files for s in f["summary"]]
    models = list(dict.fromkeys(r["model"] for r in rows))
    lens = sorted({r["prompt_len"] for r in rows})
    first = lens[0]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))

    ax = axes[0]
    series = [("dense_ms", "ours dense"), ("sparse_ms", "ours sparse"), ("transformers_ms", "transformers fp16 eager")]
    width = 0.2
    for i, (key, label) in enumerate(series):
        ys = [next((s[key] for s in summary if s["model"] == m and s["prompt_len"] == first), None) or 0 for m in models]
        ax.bar([x + i * width for x in range(len(models))], ys, width, label=label)
    floors = [next((r["floor_ms"] for r in rows if r["model"] == m and r["prompt_len"] == first and r["config"].startswith("sparse")), 0) for m in models]
    ax.bar([x + 3 * width for x in range(len(models))], floors, width, label="sparse floor (bytes / copy bandwidth)", color="grey")
    ax.set_xticks([x + 1.5 * width for x in range(len(models))])
    ax.set_xticklabels(models)
    ax.set_ylabel(f"ms per token (prompt {first}, batch 1)")
    ax.legend(fontsize=8)
    ax.set_title(f"decode latency, {j['device'].split(',')[0]}")

    ax = axes[1]
    for c, m in enumerate(models):
        for key, style, label in [("dense_ms", "o-", "dense"), ("sparse_ms", "s--", "sparse"), ("transformers_ms", "^:", "transformers")]:
            pts = [(s["prompt_len"], s[key]) for s in summary if s["model"] == m and s[key] is not None]
            if pts:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, style, color=f"C{c}", label=f"{m} {label}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lens)
    ax.set_xticklabels([str(x) for x in lens])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("ms per token")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("latency against prompt length")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main()
