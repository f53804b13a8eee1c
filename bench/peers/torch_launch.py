"""Host cost of one PyTorch CUDA launch, for comparison with `dejavu-bench launch`:
2,000 back-to-back launches of an op on 64 values (torch.add into a preallocated output,
and with a fresh output), median over rounds after a warm-up round. `enqueue_us` is the
loop's host time per launch, `total_us` the same loop synced at its end."""
import argparse, json, statistics, time

import torch


def measure(fn, launches, rounds):
    enq, tot = [], []
    for r in range(rounds + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(launches):
            fn()
        host = time.perf_counter() - t
        torch.cuda.synchronize()
        total = time.perf_counter() - t
        if r > 0:
            enq.append(host * 1e6 / launches)
            tot.append(total * 1e6 / launches)
    return statistics.median(enq), statistics.median(tot)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--launches", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", required=True)
    a = p.parse_args()
    x, y, out = (torch.ones(64, device="cuda") for _ in range(3))
    rows = []
    for name, fn in [
        ("torch.add, preallocated output", lambda: torch.add(x, y, out=out)),
        ("torch.add, output allocated", lambda: torch.add(x, y)),
    ]:
        e, t = measure(fn, a.launches, a.rounds)
        rows.append({"variant": name, "enqueue_us": e, "total_us": t})
        print(f"| {name} | {e:.2f} | {t:.2f} |")
    json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "rows": rows}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
