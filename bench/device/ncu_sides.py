"""Per kernel of a decode step's second step (step 1, the first sparse one), the median
µs a call, the registers a unit and the µs of every call together, for each side of bench/device/ncu-sides.sh.

Usage: python3 ncu_sides.py OUT SIDE [SIDE ...] (reads OUT/ncu-<side>/ncu.csv.xz)."""
import statistics
import sys

from ncu_summary import steps


def step_one(path):
    """Step 1 of the capture (the dense first step is step 0), split as ncu_summary.py
    splits it: (kernel, grid, µs, registers) a launch."""
    col, captured = steps(path)
    return [(r[col["Kernel Name"]], r[col["Grid Size"]], float(r[col["gpu__time_duration.sum"]]), r[col["launch__registers_per_thread"]]) for r in captured[1]]


def main():
    out, sides = sys.argv[1], sys.argv[2:]
    steps = {s: step_one(f"{out}/ncu-{s}/ncu.csv.xz") for s in sides}
    print("| kernel (grid) | calls | " + " | ".join(f"{s}: median µs (regs), total" for s in sides) + " |")
    print("|---|---|" + "---|" * len(sides))
    keys = []
    for s in sides:
        for name, grid, _, _ in steps[s]:
            if (name, grid) not in keys:
                keys.append((name, grid))
    for name, grid in keys:
        cells, calls = [], 0
        for s in sides:
            times = [t for n, g, t, _ in steps[s] if (n, g) == (name, grid)]
            regs = next((r for n, g, _, r in steps[s] if (n, g) == (name, grid)), "-")
            calls = max(calls, len(times))
            cells.append(f"{statistics.median(times):.2f} ({regs}), {sum(times):.1f}" if times else "-")
        print(f"| {name[:60]} {grid} | {calls} | " + " | ".join(cells) + " |")
    print("| step total | | " + " | ".join(f"{sum(t for _, _, t, _ in steps[s]):.0f}" for s in sides) + " |")


if __name__ == "__main__":
    main()
