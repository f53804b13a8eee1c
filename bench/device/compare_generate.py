#!/usr/bin/env python3
"""Compares the greedy generations two `dejavu-bench quality --prompts` runs recorded (for
example CPU and CUDA): the dense and the sparse token ids of every prompt. Exit status 1
if any differ.

    python3 bench/device/compare_generate.py quality-cpu.json quality-cuda.json
"""
import json
import sys


def main():
    a, b = (json.load(open(p)) for p in sys.argv[1:3])
    same = True
    print(f"{a['backend']} ({a['device']}) vs {b['backend']} ({b['device']}), sparse point {a['generate_point']}")
    for x, y in zip(a["generations"], b["generations"]):
        assert x["prompt"] == y["prompt"]
        for kind in ("dense", "sparse"):
            s, t = x[f"{kind}_tokens"], y[f"{kind}_tokens"]
            first = next((i for i in range(min(len(s), len(t))) if s[i] != t[i]), None)
            ok = first is None and len(s) == len(t)
            same &= ok
            status = "identical" if ok else f"first difference at token {first}"
            print(f"  {x['prompt']!r:45} {kind:6} {len(s)} tokens: {status}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
