#!/usr/bin/env python3
"""Peer for `dejavu-bench kernels`: PyTorch on CUDA at the same MLP shapes and densities.

Rows (GPU microseconds per call, batch 1):
- torch_dense_fc1 / torch_dense_mlp: cuBLAS GEMV (F.linear) over every row; the MLP is
  linear + ReLU + linear, the dense fp16 MLP the sparse one must beat;
- torch_index_select_fc1 / _mlp: index_select of the selected rows, then GEMV (the naive
  gather: the rows are copied, then read again);
- torch_slice_fc1 / _mlp: a contiguous slice of the same number of rows (fc1[:K],
  fc2ᵀ[:K]): the ceiling a gather kernel can reach at those bytes;
- torch_select: torch.topk of 10% of one row of ffn logits;
- torch_predictor_select_r{rank}: the two low-rank GEMVs + topk(10%);
- torch_attention_dense_ctx{len}: one decode step's attention block over every head
  (QKV F.linear, scaled_dot_product_attention over a KV cache of len positions,
  out_proj F.linear): the dense baseline for our selected-head attention.

Timing: for each sample the GPU first sleeps (torch.cuda._sleep) while the host enqueues
the calls; CUDA events around the calls then give device time without launch gaps (the
same quantity our benchmark measures with a primer). Weights rotate over copies so that
one cycle touches --rotate-mb of distinct bytes (the L2 cannot serve repeats). Median over
samples. Also the device-to-device copy bandwidth.
"""
import argparse
import json
import math
import statistics

import torch
import torch.nn.functional as F

HEADS = {"opt-125m": 12, "opt-1.3b": 32, "opt-2.7b": 32, "opt-6.7b": 32, "opt-13b": 40, "opt-30b": 56, "opt-66b": 72}
SHAPES = {"opt-125m": 768, "opt-1.3b": 2048, "opt-2.7b": 2560, "opt-6.7b": 4096,
          "opt-13b": 5120, "opt-30b": 7168, "opt-66b": 9216}


def gpu_us(fn, calls, samples, sleep_cycles):
    fn(0)  # warm-up
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(samples):
        torch.cuda._sleep(sleep_cycles)
        start.record()
        for i in range(calls):
            fn(i)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times), times


def copy_gbs():
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        y.copy_(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * (1 << 30) / statistics.median(times) / 1e9


@torch.inference_mode()
def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="opt-6.7b,opt-13b,opt-30b")
    p.add_argument("--densities", default="0.05,0.1,0.25,0.5,0.8,1.0")
    p.add_argument("--ranks", default="128,256,1000")
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--samples", type=int, default=11)
    p.add_argument("--rotate-mb", type=int, default=256)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--contexts", default="128,512,1024")
    p.add_argument("--sleep-cycles", type=int, default=20_000_000)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    densities = [float(x) for x in args.densities.split(",")]
    ranks = [int(x) for x in args.ranks.split(",")]
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(7)

    def push(model, op, density, k, nbytes, t):
        med, samples = t
        rows.append({"model": model, "op": op, "density": density, "k": k, "weight_bytes": nbytes,
                     "gpu_us": med, "gpu_samples_us": samples, "gpu_gbs": nbytes / med / 1e3})
        print(f"  {op:<28} {'' if density is None else density:>6} {med:9.2f} us  {nbytes / med / 1e3:7.0f} GB/s",
              flush=True)

    bw = copy_gbs()
    print(f"torch copy bandwidth {bw:.0f} GB/s", flush=True)
    for model in args.models.split(","):
        d = SHAPES[model]
        ffn = 4 * d
        esize = torch.tensor([], dtype=dtype).element_size()
        matrix = d * ffn * esize
        copies = int(min(64, max(2, math.ceil(args.rotate_mb * 1e6 / (2 * matrix * min(densities))))))
        print(f"{model}: d {d} ffn {ffn}, {copies} copies", flush=True)
        mk = lambda *s: (torch.rand(*s, device="cuda", dtype=dtype, generator=gen) - 0.5) * 0.1
        W = [dict(w1=mk(ffn, d), b1=mk(ffn), w2=mk(d, ffn), w2t=mk(ffn, d), b2=mk(d)) for _ in range(copies)]
        x = mk(1, d)
        h_full = torch.rand(1, ffn, device="cuda", dtype=dtype, generator=gen) + 0.1
        t = lambda fn: gpu_us(fn, args.calls, args.samples, args.sleep_cycles)

        def dense_fc1(i):
            w = W[i % copies]
            F.linear(x, w["w1"])

        def dense_mlp(i):
            w = W[i % copies]
            h = F.relu(F.linear(x, w["w1"], w["b1"]))
            F.linear(h, w["w2"], w["b2"])

        push(model, "torch_dense_fc1", None, None, matrix, t(dense_fc1))
        push(model, "torch_dense_mlp", None, None, 2 * matrix, t(dense_mlp))

        for p_ in densities:
            k = max(1, min(ffn, round(p_ * ffn)))
            idx = torch.randperm(ffn, device="cuda", generator=gen)[:k].sort().values
            h = torch.rand(1, k, device="cuda", dtype=dtype, generator=gen) + 0.1
            nbytes = k * d * esize

            def index_fc1(i):
                w = W[i % copies]
                F.linear(x, w["w1"].index_select(0, idx), w["b1"].index_select(0, idx))

            def index_mlp(i):
                w = W[i % copies]
                hh = F.relu(F.linear(x, w["w1"].index_select(0, idx), w["b1"].index_select(0, idx)))
                torch.addmm(w["b2"].unsqueeze(0), hh, w["w2t"].index_select(0, idx))

            def slice_fc1(i):
                w = W[i % copies]
                F.linear(x, w["w1"][:k], w["b1"][:k])

            def slice_mlp(i):
                w = W[i % copies]
                hh = F.relu(F.linear(x, w["w1"][:k], w["b1"][:k]))
                torch.addmm(w["b2"].unsqueeze(0), hh, w["w2t"][:k])

            push(model, "torch_index_select_fc1", p_, k, nbytes, t(index_fc1))
            push(model, "torch_index_select_mlp", p_, k, 2 * nbytes, t(index_mlp))
            push(model, "torch_slice_fc1", p_, k, nbytes, t(slice_fc1))
            push(model, "torch_slice_mlp", p_, k, 2 * nbytes, t(slice_mlp))

        logits = torch.randn(1, ffn, device="cuda", dtype=dtype, generator=gen)
        k10 = ffn // 10
        push(model, "torch_select", 0.1, k10, 0, t(lambda i: torch.topk(logits, k10, sorted=False)))
        for r in ranks:
            pc = max(copies, 4)
            P = [(mk(r, d), mk(ffn, r)) for _ in range(pc)]

            def pred(i):
                a, b = P[i % pc]
                torch.topk(F.linear(F.linear(x, a), b), k10, sorted=False)

            push(model, f"torch_predictor_select_r{r}", None, None, (r * d + ffn * r) * esize, t(pred))
        del W, P
        torch.cuda.empty_cache()
        H = HEADS[model]
        hd = d // H
        acopies = int(min(16, max(2, math.ceil(args.rotate_mb * 1e6 / (4 * d * d * esize)))))
        A = [dict(wqkv=mk(3 * d, d), bqkv=mk(3 * d), wo=mk(d, d), bo=mk(d)) for _ in range(acopies)]
        for length in [int(c) for c in args.contexts.split(",") if c]:
            kvc = int(min(32, max(2, math.ceil(args.rotate_mb * 1e6 / (2 * H * length * hd * esize)))))
            C = [(mk(1, H, length, hd), mk(1, H, length, hd)) for _ in range(kvc)]

            def attention(i):
                a = A[i % acopies]
                k, v = C[i % kvc]
                qkv = F.linear(x, a["wqkv"], a["bqkv"])
                q = qkv[:, :d].view(1, H, 1, hd)
                o = F.scaled_dot_product_attention(q, k, v)
                F.linear(o.reshape(1, d), a["wo"], a["bo"])

            push(model, f"torch_attention_dense_ctx{length}", None, H,
                 (4 * d * d + 2 * H * length * hd) * esize, t(attention))
            del C
        del A
        torch.cuda.empty_cache()

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(),
           "dtype": args.dtype, "copy_bandwidth_gbs": bw, "calls": args.calls, "samples": args.samples,
           "sleep_cycles": args.sleep_cycles}
    with open(args.json, "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
