"""Issue 3, attention predictors: does another loss, input or capacity pick the top-30%
heads better than the weighted BCE that `dejavu-train fit` uses?

Reads a `dejavu-train record` folder (its safetensors shards), trains, for layers 1..L-1
at once (batched matmuls), the low-rank predictor `Linear(d -> r) -> Linear(r -> heads)`
(no bias, as in `predictor/`) with each loss below, on the lookahead-1 pairing (layer
l-1's attention input -> layer l's heads) and on lookahead 0 (layer l's own input), and
reports on the validation rows, per layer: recall of the true top-k heads within the
predicted top-K (K = k .. heads), the density a global threshold needs for recall 0.95
(as `fit`'s calibration does), and for BCE the recall at logit 0.

Losses:
  wbce      weighted BCE, negatives weighted by the positive rate (what `fit` does)
  listwise  softmax cross-entropy over the heads, the top-k as the target
  lognorm   regression of each head's log norm (centred per token) — uses the whole
            ranking, not only the cut
Capacity bound (not the issue's predictor shape): `mlp`, Linear(d, 512) + ReLU +
Linear(512, heads), weighted BCE.
Baseline without a model: the previous token's top-K heads (same document).

usage: python3 attention_loss.py REC_DIR OUT_JSON [--rank 128] [--epochs 20]
"""
import argparse
import glob
import json
import math
import time

import numpy as np
import torch
from safetensors.numpy import load_file

p = argparse.ArgumentParser()
p.add_argument("rec")
p.add_argument("out")
p.add_argument("--rank", type=int, default=128)
p.add_argument("--epochs", type=int, default=20)
p.add_argument("--batch", type=int, default=1024)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--fraction", type=float, default=0.3)
args = p.parse_args()
dev = "cuda"
torch.manual_seed(0)


def load(split):
    files = sorted(glob.glob(f"{args.rec}/{split}-*.safetensors"))
    parts = [load_file(f) for f in files]
    layers = 1 + max(int(k.split(".")[1]) for k in parts[0] if k.startswith("layer."))
    def cat(name):
        return np.concatenate([q[name] for q in parts])
    att = torch.from_numpy(np.stack([cat(f"layer.{l}.attention_input") for l in range(layers)]))
    norms = torch.from_numpy(np.stack([cat(f"layer.{l}.head_norms") for l in range(layers)]))
    doc = torch.from_numpy(cat("document").astype(np.int64))
    pos = torch.from_numpy(cat("position").astype(np.int64))
    return att.to(dev), norms.float().to(dev), doc.to(dev), pos.to(dev), len(files)


t0 = time.time()
train_att, train_norms, _, _, ntrain = load("train")
valid_att, valid_norms, valid_doc, valid_pos, nvalid = load("valid")
L, rows, d = train_att.shape
heads = train_norms.shape[2]
k = max(1, min(heads, math.floor(args.fraction * heads)))
print(f"loaded {ntrain} + {nvalid} shards: {rows} train, {valid_att.shape[1]} valid rows, {L} layers, d {d}, {heads} heads, top {k} in {time.time() - t0:.1f} s", flush=True)


def labels(norms):
    top = norms.topk(k, dim=-1).indices
    y = torch.zeros_like(norms)
    y.scatter_(-1, top, 1.0)
    return y


train_y, valid_y = labels(train_norms), labels(valid_norms)
train_lognorm = torch.log(train_norms + 1e-4)
train_lognorm = train_lognorm - train_lognorm.mean(-1, keepdim=True)
layers = list(range(1, L))


def inputs(att, lookahead):
    return att[[l - lookahead for l in layers]]  # [layers, rows, d]


def metrics(scores, y):
    """scores, y: [rows, heads] of one layer."""
    out = {}
    order = scores.argsort(dim=-1, descending=True)
    ranked = y.gather(-1, order)
    positives = y.sum()
    for K in range(k, heads + 1):
        out[f"recall_top{K}"] = round((ranked[:, :K].sum() / positives).item(), 4)
    pos_scores = scores[y > 0.5]
    thr = torch.quantile(pos_scores.float(), 0.05)
    out["density_at_recall_0.95"] = round((scores >= thr).float().mean().item(), 4)
    pos_scores_99 = torch.quantile(pos_scores.float(), 0.01)
    out["density_at_recall_0.99"] = round((scores >= pos_scores_99).float().mean().item(), 4)
    out["true_density"] = round((y.mean()).item(), 4)
    return out


def train(kind, loss, lookahead):
    X = inputs(train_att, lookahead)
    Xv = inputs(valid_att, lookahead).float()
    Y = train_y[layers]
    T = train_lognorm[layers]
    n = len(layers)
    if kind == "lowrank":
        w1 = (torch.randn(n, d, args.rank, device=dev) / math.sqrt(d)).requires_grad_()
        w2 = (torch.randn(n, args.rank, heads, device=dev) / math.sqrt(args.rank)).requires_grad_()
        params = [w1, w2]

        def f(x):
            return torch.bmm(torch.bmm(x, w1), w2)
    else:
        hidden = 512
        w1 = (torch.randn(n, d, hidden, device=dev) / math.sqrt(d)).requires_grad_()
        b1 = torch.zeros(n, 1, hidden, device=dev, requires_grad=True)
        w2 = (torch.randn(n, hidden, heads, device=dev) / math.sqrt(hidden)).requires_grad_()
        b2 = torch.zeros(n, 1, heads, device=dev, requires_grad=True)
        params = [w1, b1, w2, b2]

        def f(x):
            return torch.bmm(torch.relu(torch.bmm(x, w1) + b1), w2) + b2
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    rate = Y.mean(dim=(1, 2), keepdim=True)  # positive rate per layer
    best = None
    history = []
    for epoch in range(args.epochs):
        perm = torch.randperm(rows, device=dev)
        for s in range(0, rows - args.batch + 1, args.batch):
            idx = perm[s:s + args.batch]
            x = X[:, idx].float()
            z = f(x)
            y = Y[:, idx]
            if loss == "wbce":
                w = y * (1 - rate) + rate
                l = torch.nn.functional.binary_cross_entropy_with_logits(z, y, weight=w)
            elif loss == "listwise":
                l = -(torch.log_softmax(z, dim=-1) * y).sum(-1).mean() / k
            else:  # lognorm
                zc = z - z.mean(-1, keepdim=True)
                l = ((zc - T[:, idx]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            l.backward()
            opt.step()
        with torch.no_grad():
            zv = f(Xv)
            per = [metrics(zv[i], valid_y[layers[i]]) for i in range(n)]
        score = sum(m["density_at_recall_0.95"] for m in per)
        history.append(round(score / n, 4))
        if best is None or score < best[0]:
            best = (score, epoch, per, zv)
    _, epoch, per, zv = best
    if loss == "wbce":
        for i, m in enumerate(per):
            y = valid_y[layers[i]]
            pred = zv[i] > 0
            m["recall_at_0"] = round(((pred & (y > 0.5)).sum() / y.sum()).item(), 4)
            m["density_at_0"] = round(pred.float().mean().item(), 4)
    return {"best_epoch": epoch + 1, "mean_density_at_recall_0.95_by_epoch": history, "layers": {str(l): m for l, m in zip(layers, per)}}


results = {"recording": args.rec, "rank": args.rank, "epochs": args.epochs, "batch": args.batch, "lr": args.lr,
           "top_k": k, "heads": heads, "train_rows": rows, "valid_rows": int(valid_att.shape[1]),
           "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": {}}

# The previous token's top-K (same document, previous position) as the prediction.
prev_ok = torch.zeros_like(valid_doc, dtype=torch.bool)
prev_ok[1:] = (valid_doc[1:] == valid_doc[:-1]) & (valid_pos[1:] == valid_pos[:-1] + 1)
base = {}
for l in layers:
    s = valid_norms[l].clone()
    s[1:] = valid_norms[l][:-1]
    base[str(l)] = metrics(s[prev_ok], valid_y[l][prev_ok])
results["runs"]["previous_token_norms"] = {"layers": base}

for kind, loss, lookahead in [("lowrank", "wbce", 1), ("lowrank", "listwise", 1), ("lowrank", "lognorm", 1),
                              ("lowrank", "wbce", 0), ("lowrank", "listwise", 0), ("lowrank", "lognorm", 0),
                              ("mlp", "wbce", 1), ("mlp", "wbce", 0)]:
    t = time.time()
    name = f"{kind}-{loss}-lookahead{lookahead}"
    results["runs"][name] = train(kind, loss, lookahead)
    results["runs"][name]["seconds"] = round(time.time() - t, 1)
    print(f"{name}: {results['runs'][name]['seconds']} s, best epoch {results['runs'][name]['best_epoch']}", flush=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1)

# The table: per run, per layer, density at recall 0.95 and recall of the top-3.
names = list(results["runs"])
print("density at recall 0.95 (global threshold), per layer; true density", k / heads)
print("| run | " + " | ".join(str(l) for l in layers) + " | mean |")
for name in names:
    ls = results["runs"][name]["layers"]
    vals = [ls[str(l)]["density_at_recall_0.95"] for l in layers]
    print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {sum(vals) / len(vals):.3f} |")
print(f"recall of the top {k} within the predicted top {k + 1}, per layer")
for name in names:
    ls = results["runs"][name]["layers"]
    vals = [ls[str(l)][f"recall_top{k + 1}"] for l in layers]
    print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {sum(vals) / len(vals):.3f} |")
