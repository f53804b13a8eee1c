#!/usr/bin/env python3
"""Peer for `dejavu-bench dense` and `dejavu-bench e2e`: Hugging Face transformers OPT, fp16, eager attention,
batch-1 decode latency per token on CUDA, on the same shapes and prompt lengths.

Published shapes get random weights built on the GPU from an OPTConfig (latency does not
depend on weight values); `opt-mini` is loaded from the bundled folder. Each run prefills
the prompt, then decodes one token at a time through the KV cache (greedy, `.item()` per
step, as our loop reads each token back); the per-token time is the decode time of the
last N-1 steps / (N-1). One warm-up run first; median over runs is taken by the caller.

`--mode static-compile` times the other way transformers can decode: `generate()` with a
static cache, which on CUDA compiles the decode step itself (torch.compile with CUDA graphs,
its `compile_config`); per-token time = (time of N new tokens - time of 1) / (N - 1), the
prompt's prefill cancelling out. Its warm-up runs compile. (Compiling the forward ourselves
failed twice on the H100: CUDA graphs' outputs overwritten under generate, and a
data-dependent guard in OPT's mask code under fullgraph.)
"""
import argparse
import json
import time

import torch
import transformers
from transformers import OPTConfig, OPTForCausalLM

SHAPES = {  # hidden, layers, heads (ffn = 4 * hidden)
    "opt-125m": (768, 12, 12),
    "opt-1.3b": (2048, 24, 32),
    "opt-2.7b": (2560, 32, 32),
    "opt-6.7b": (4096, 32, 32),
    "opt-13b": (5120, 40, 40),
    "opt-30b": (7168, 48, 56),
}


def build(name, opt_mini):
    if name == "opt-mini":
        return OPTForCausalLM.from_pretrained(
            opt_mini, torch_dtype=torch.float16, attn_implementation="eager"
        ).cuda().eval()
    d, layers, heads = SHAPES[name]
    config = OPTConfig(
        hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
        ffn_dim=4 * d, word_embed_proj_dim=d, vocab_size=50272,
        max_position_embeddings=2048, do_layer_norm_before=True,
        torch_dtype="float16", attn_implementation="eager",
    )
    config._attn_implementation = "eager"
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        model = OPTForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    return model.eval()


@torch.inference_mode()
def decode_ms_per_token(model, prompt, new_tokens):
    out = model(prompt, use_cache=True)
    past = out.past_key_values
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    token.item()
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(token, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        token.item()
    return (time.perf_counter() - start) * 1e3 / (new_tokens - 1)


@torch.inference_mode()
def static_compile_ms_per_token(model, prompt, new_tokens):
    # generate() compiles the decode step itself (torch.compile, CUDA graphs) when the
    # cache is static, on CUDA; the prompt's prefill is in both timings and cancels out.
    kwargs = dict(do_sample=False, cache_implementation="static", pad_token_id=model.config.pad_token_id)

    def timed(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kwargs)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    return (timed(new_tokens) - timed(1)) * 1e3 / (new_tokens - 1)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default="opt-mini,opt-1.3b,opt-6.7b")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--prompt-lens", default=None,
                   help="comma-separated prompt lengths; results are then keyed model@length")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--opt-mini", default="assets/opt-mini")
    p.add_argument("--json", required=True)
    p.add_argument("--mode", choices=["eager", "static-compile"], default="eager",
                   help="eager: our loop over forward() with the dynamic cache (the default peer); "
                        "static-compile: generate() with a static cache, which compiles the decode step")
    a = p.parse_args()
    runs_ms = {}
    lens = [int(x) for x in a.prompt_lens.split(",")] if a.prompt_lens else [a.prompt_len]
    for name in a.models.split(","):
        model = build(name, a.opt_mini)
        measure = static_compile_ms_per_token if a.mode == "static-compile" else decode_ms_per_token
        vocab = model.config.vocab_size
        for length in lens:
            key = f"{name}@{length}" if a.prompt_lens else name
            prompt = torch.tensor(
                [[3 + (i * 7919 + 17) % (vocab - 3) for i in range(length)]], device="cuda"
            )
            warm = time.perf_counter()
            measure(model, prompt, a.new_tokens)  # warm-up (and, static-compile, compilation)
            if a.mode == "static-compile":
                measure(model, prompt, a.new_tokens)
                compiled = hasattr(model, "_compiled_call")
                print(f"  {key}: warmed up in {time.perf_counter() - warm:.0f} s; generate compiled the step: {compiled}", flush=True)
            runs_ms[key] = [measure(model, prompt, a.new_tokens) for _ in range(a.runs)]
            print(f"transformers {a.mode} {key}: {sorted(runs_ms[key])[len(runs_ms[key]) // 2]:.3f} ms/token", flush=True)
        del model
        torch.cuda.empty_cache()
    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0),
        "attention": "eager",
        "dtype": "float16",
        "mode": a.mode,
    }
    with open(a.json, "w") as f:
        json.dump({"runs_ms": runs_ms, "env": env}, f, indent=1)


if __name__ == "__main__":
    main()
