#!/usr/bin/env python3
"""Compares sparse greedy generations of the same prompts on two backends: the token ids
of `dejavu generate --json` files, pairwise. Exit status 1 if any differ.

    python3 bench/device/compare_generate.py cpu-1.json,cpu-2.json,... cuda-1.json,cuda-2.json,...
"""
import json
import sys


def main():
    left, right = (s.split(",") for s in sys.argv[1:3])
    same = True
    for a, b in zip(left, right):
        x, y = json.load(open(a)), json.load(open(b))
        assert x["prompt"] == y["prompt"], (a, b)
        n = min(len(x["new_tokens"]), len(y["new_tokens"]))
        first = next((i for i in range(n) if x["new_tokens"][i] != y["new_tokens"][i]), None)
        status = "identical" if first is None and n == 32 else f"first difference at token {first}"
        same &= first is None and n == 32
        print(f"{x['prompt']!r}: {n} tokens, {x['backend']} vs {y['backend']}: {status}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
