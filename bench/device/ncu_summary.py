#!/usr/bin/env python3
"""Per-kernel totals of each captured decode step in an `ncu --csv --page raw` export
(bench/device/ncu-step.sh): a step starts at the embedding's first select_kernel."""
import collections
import csv
import lzma
import sys


def steps(path):
    """The export's column indices by name and its launches, one list of rows a step."""
    opener = lzma.open if path.endswith(".xz") else open
    with opener(path, "rt") as f:
        rows = list(csv.reader(f))
    header, data = rows[0], rows[2:]
    col = {h: i for i, h in enumerate(header)}
    name = lambda r: r[col["Kernel Name"]]
    # A step starts with the decoder's input: Burn's lookup (`select_kernel`, twice in a row
    # in older binaries) or, in a sparse step with an f32 residual, `embed_rows`.
    first = lambda n: n.startswith("select_kernel") or n.startswith("embed_rows_kernel")
    starts = [i for i, r in enumerate(data) if first(name(r)) and (i == 0 or not first(name(data[i - 1])))]
    return col, [data[a:b] for a, b in zip(starts, starts[1:] + [len(data)])]


def main():
    col, captured = steps(sys.argv[1])
    name = lambda r: r[col["Kernel Name"]]
    for w, step in enumerate(captured):
        totals = collections.OrderedDict()
        for r in step:
            t = totals.setdefault((name(r), r[col["Grid Size"]]), [0, 0.0, 0.0])
            t[0] += 1
            t[1] += float(r[col["gpu__time_duration.sum"]])
            t[2] += float(r[col["dram__bytes_read.sum"]])
        print(f"step {w}: {len(step)} kernels, {sum(t[1] for t in totals.values()):.0f} µs")
        print("| kernel | grid | calls | µs total | µs mean | MB read / call | GB/s |")
        print("|---|---|---|---|---|---|---|")
        for (n, g), (c, us, mb) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
            print(f"| {n[:60]} | {g} | {c} | {us:.1f} | {us / c:.2f} | {mb / c:.2f} | {mb / us * 1e3:.0f} |")


if __name__ == "__main__":
    main()
