#!/usr/bin/env python3
"""Where a dejavu-bench process's host threads run, and what that does to its decode step.

  placement.py watch PID OUT MODE A B   sample every thread's CPU (from /proc/PID/task/*/stat)
                                         every 50 ms until PID exits, into OUT (one line a
                                         sample: time, tid, name, cpu); MODE `apart` pins the
                                         model's thread (tid = PID) to CPU A and CubeCL's
                                         device thread(s) (`DSD-*`) to CPU B, `together` pins
                                         both to A, `plain` pins nothing
  placement.py summary DIR              one row a process of DIR (e2e-<mode>-<k>.log with its
                                         .threads and .stat files): its sparse and dense
                                         ms/token, × floor, the host's and the GPU's step, the
                                         guest's steal time, and how often the two threads
                                         shared a CPU or a core

Why: the 6.7B sparse step's processes spread over 1.49-1.89x the floor at the same GPU step
(runs 98-100) because in some of them the host's enqueueing took longer than the GPU. Two
host threads do that work (ours, and CubeCL's device thread, which takes the launches
through a channel), and both spin while they wait: on one CPU, or on two hyperthreads of
one core, each would slow the other.
"""
import glob
import lzma
import os
import re
import sys
import time


def thread_cpus(pid):
    rows = []
    for stat in glob.glob(f"/proc/{pid}/task/*/stat"):
        try:
            with open(stat) as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        rest = text[text.rindex(")") + 2:].split()
        # fields after the name start at field 3 (state); field 39 is the CPU last run on
        rows.append((int(stat.split("/")[4]), name, int(rest[36])))
    return rows


def watch(pid, out, mode, a, b):
    pinned = set()
    t0 = time.time()
    with open(out, "w") as f:
        f.write(f"# pid {pid} mode {mode} a {a} b {b}\n")
        while os.path.exists(f"/proc/{pid}"):
            now = time.time() - t0
            for tid, name, cpu in thread_cpus(pid):
                if mode != "plain" and tid not in pinned and (tid == pid or name.startswith("DSD")):
                    target = a if (tid == pid or mode == "together") else b
                    try:
                        os.sched_setaffinity(tid, {target})
                        pinned.add(tid)
                        f.write(f"# pinned {tid} {name} to {target} at {now:.2f}s\n")
                    except OSError as e:
                        f.write(f"# could not pin {tid} {name}: {e}\n")
                f.write(f"{now:.2f} {tid} {name} {cpu}\n")
            f.flush()
            time.sleep(0.05)


def core_of(d):
    """CPU → (package, core) of the machine that ran the processes, from the cpus.txt that
    placement-e2e.sh writes in `d` (empty without it: no core is then said to be shared)."""
    cores = {}
    listing = os.path.join(d, "cpus.txt")
    if os.path.exists(listing):
        for line in open(listing):
            m = re.match(r"cpu(\d+) core (\S+) siblings \S+ package (\S+)", line)
            if m:
                cores[int(m.group(1))] = (m.group(3), m.group(2))
    return cores


def row_value(log, config, column):
    """A number from the e2e log's tables: `column` counts from the row's end."""
    for line in log.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 3 and cells[0] == "opt-6.7b" and config(cells):
            try:
                return float(cells[column])
            except ValueError:
                return None
    return None


def opener(path):
    return lzma.open if path.endswith(".xz") else open


def threads_file(log_path):
    """The thread samples of an e2e log (`.threads`, or compressed `.threads.xz`), or None."""
    return next((p for p in (log_path[:-4] + ".threads", log_path[:-4] + ".threads.xz") if os.path.exists(p)), None)


def summary(d):
    cores = core_of(d)
    print("| process | sparse ms/token | × floor | host step µs | GPU step µs | dense ms/token | dense × floor | steal % | samples: same CPU / same core | CPUs of the model thread / DSD |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    def first_pid(log_path):
        threads = threads_file(log_path)
        return int(opener(threads)(threads, "rt").readline().split()[2]) if threads else 0

    # In the order the processes ran (their pids grow).
    for log_path in sorted(glob.glob(f"{d}/e2e-*.log"), key=first_pid):
        name = os.path.basename(log_path)[4:-4]
        log = open(log_path).read()
        sparse = lambda c: c[2].startswith("sparse") and len(c) == 8
        dense = lambda c: c[2] == "dense" and len(c) == 8
        ms, floor = row_value(log, sparse, 3), row_value(log, sparse, 7)
        dms, dfloor = row_value(log, dense, 3), row_value(log, dense, 7)
        host = row_value(log, lambda c: c[2].startswith("sparse") and c[3] == "host", -1)
        gpu = row_value(log, lambda c: c[2].startswith("sparse") and c[3].startswith("device"), -1)
        steal = "—"
        stat = log_path[:-4] + ".stat"
        if os.path.exists(stat):
            before, after = open(stat).read().split("\n")[:2]
            vals = lambda s: [int(x) for x in s.split()[1:]]
            b, a = vals(before), vals(after)
            total = sum(a) - sum(b)
            steal = f"{100.0 * (a[7] - b[7]) / max(total, 1):.2f}"
        same_cpu = same_core = n = 0
        cpus_main, cpus_dsd = set(), set()
        threads = threads_file(log_path)
        if threads:
            # CubeCL starts two `DSD-0-0` threads; the first (lowest id) takes the launches,
            # the second sat idle in every process of run 102.
            pid, device_tid = None, None
            by_time = {}
            for line in opener(threads)(threads, "rt"):
                if line.startswith("# pid"):
                    pid = int(line.split()[2])
                if line.startswith("#"):
                    continue
                t, tid, tname, cpu = line.split()
                if tname.startswith("DSD") and (device_tid is None or int(tid) < device_tid):
                    device_tid = int(tid)
                by_time.setdefault(t, {})[int(tid)] = int(cpu)
            for sample in by_time.values():
                m, dsd = sample.get(pid), sample.get(device_tid)
                if m is None or dsd is None:
                    continue
                n += 1
                cpus_main.add(m)
                cpus_dsd.add(dsd)
                same_cpu += m == dsd
                same_core += m in cores and cores.get(m) == cores.get(dsd)
        share = f"{same_cpu}/{n} · {same_core}/{n}" if n else "—"
        fmt = lambda v, p: "—" if v is None else f"{v:.{p}f}"
        print(f"| {name} | {fmt(ms, 3)} | {fmt(floor, 2)} | {fmt(host, 0)} | {fmt(gpu, 0)} | {fmt(dms, 3)} | {fmt(dfloor, 2)} | {steal} | {share} | {len(cpus_main)} / {len(cpus_dsd)} |")


if __name__ == "__main__":
    if sys.argv[1] == "watch":
        watch(int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    else:
        summary(sys.argv[2])
