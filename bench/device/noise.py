#!/usr/bin/env python3
"""Lines up each timed e2e run (runs_ms, runs_context) of bench/device/noise-e2e.sh with
the nvidia-smi log taken beside it: per run, ms/token, the GPU's SM and memory clocks
(mean and lowest sample), power, the throttle reasons seen, and the context switches of
the process's threads.

Usage: python3 noise.py OUT (reads OUT/clock.txt, OUT/smi.csv or smi.csv.xz, OUT/e2e-*.json;
runs without runs_context, from older binaries, are left out)."""
import csv
import datetime
import glob
import json
import lzma
import os
import sys


def samples(out):
    """[(unix ms, {column: value})] of the nvidia-smi log."""
    unix_ms, zone = open(f"{out}/clock.txt").read().split()
    path = f"{out}/smi.csv"
    log = open(path) if os.path.exists(path) else lzma.open(path + ".xz", "rt")
    rows = [r for r in csv.reader(log) if r]
    header = [h.strip() for h in rows[0]]
    parsed = []
    for r in rows[1:]:
        if len(r) != len(header):
            continue
        stamp = datetime.datetime.strptime(r[0].strip(), "%Y/%m/%d %H:%M:%S.%f")
        parsed.append((stamp, dict(zip(header[1:], (v.strip() for v in r[1:])))))
    if zone == "UTC":
        at = lambda s: s.replace(tzinfo=datetime.timezone.utc).timestamp() * 1e3
    else:
        # Another zone: the log's first sample was taken right after clock.txt.
        offset = int(unix_ms) - parsed[0][0].timestamp() * 1e3
        at = lambda s: s.timestamp() * 1e3 + offset
    return header, [(at(s), v) for s, v in parsed]


def column(header, prefix):
    return next(h for h in header if h.startswith(prefix))


def main():
    out = sys.argv[1]
    header, log = samples(out)
    sm, mem, power = column(header, "clocks.current.sm"), column(header, "clocks.current.memory"), column(header, "power.draw")
    reasons = column(header, "clocks_event_reasons.active") if any(h.startswith("clocks_event_reasons") for h in header) else column(header, "clocks_throttle_reasons.active")
    print("| process | row | run | ms/token | SM MHz mean (min) | memory MHz | power W | throttle reasons | involuntary / voluntary switches |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in sorted(glob.glob(f"{out}/e2e-*.json")):
        d = json.load(open(path))
        for row in d["rows"]:
            for k, (ms, ctx) in enumerate(zip(row["runs_ms"], row.get("runs_context", []))):
                start = ctx["start_unix_ms"]
                end = start + ms * (d["new_tokens"] - 1) + 50
                inside = [v for t, v in log if start <= t <= end]
                if not inside:
                    print(f"| {path.split('/')[-1]} | {row['config'][:6]} | {k} | {ms:.3f} | no samples | | | | |")
                    continue
                clocks = [float(v[sm]) for v in inside]
                mems = [float(v[mem]) for v in inside]
                watts = [float(v[power]) for v in inside]
                seen = sorted({v[reasons] for v in inside})
                print(
                    f"| {path.split('/')[-1]} | {row['config'][:6]} | {k} | {ms:.3f} | {sum(clocks) / len(clocks):.0f} ({min(clocks):.0f}) | "
                    f"{sum(mems) / len(mems):.0f} | {sum(watts) / len(watts):.0f} | {' '.join(seen)} | "
                    f"{ctx['involuntary_switches']} / {ctx['voluntary_switches']} |"
                )


if __name__ == "__main__":
    main()
