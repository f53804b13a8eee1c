#!/usr/bin/env python3
"""Reference perplexity with Hugging Face transformers, computed as in the Hugging Face
perplexity guide (strided windows; each token scored once) or, with --non-overlapping,
as in the OPT/GPTQ papers. Independent of our code: the check for `dejavu perplexity`.
"""
import argparse
import json
import math

import torch
from transformers import AutoTokenizer, OPTForCausalLM


@torch.inference_mode()
def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--file", required=True)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--non-overlapping", action="store_true")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", required=True)
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = OPTForCausalLM.from_pretrained(a.model, torch_dtype=dtype, attn_implementation="eager").cuda().eval()
    text = open(a.file, encoding="utf-8").read()
    ids = tok(text, return_tensors="pt").input_ids.cuda()
    n = ids.size(1)
    nll, scored = 0.0, 0
    if a.non_overlapping:
        spans = [(i * a.window, (i + 1) * a.window, 1) for i in range(n // a.window)]
    else:
        spans, prev_end = [], 0
        for begin in range(0, n, a.stride):
            end = min(begin + a.window, n)
            spans.append((begin, end, max(1, (end - begin) - (end - prev_end))))
            prev_end = end
            if end == n:
                break
    for begin, end, score_from in spans:
        window = ids[:, begin:end]
        logits = model(window).logits.float()
        logp = torch.log_softmax(logits[0, :-1], -1).gather(-1, window[0, 1:, None])[:, 0]
        nll -= logp[score_from - 1:].double().sum().item()
        scored += logp.numel() - (score_from - 1)
    result = {"perplexity": math.exp(nll / scored), "nll_sum": nll, "tokens_scored": scored,
              "text_tokens": n, "windows": len(spans), "dtype": a.dtype,
              "method": "non_overlapping" if a.non_overlapping else "strided",
              "window": a.window, "stride": a.stride}
    print(json.dumps(result))
    with open(a.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
