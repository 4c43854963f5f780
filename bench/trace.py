"""Benchmark of the trace estimators on the default model (ResNet-20, Fashion-MNIST), issue 3 item 8.

For each estimator: images, backward passes / HVPs and wall time until every layer holding >= 1% of the
total trace has <= 5% relative standard error; Spearman rank correlation of the traces between two seeds;
the cost of one HVP as a ratio to a forward+backward; PyHessian's trace at the same number of probes.

    .venv/bin/python bench/trace.py --checkpoint run/fp32.pt        # or: --train-epochs 1 (cached)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

import hawq.models as M
from hawq.data import batches, load_split
from hawq.hessian import TraceResult, estimate_traces
from hawq.io import load_torch, save_torch

CACHE = Path(os.environ.get("HAWQ_BENCH_CACHE", "/tmp/hawq_bench"))


def train_quick(epochs: int = 1, seed: int = 0, path: Path | None = None) -> nn.Module:
    """ResNet-20 trained `epochs` epochs with SGD+cosine (a stand-in until the pipeline caches one)."""
    path = path or CACHE / f"resnet20_fmnist_e{epochs}_s{seed}.pt"
    model = M.create_model("resnet20", in_channels=1, num_classes=10)
    if path.exists():
        model.load_state_dict(load_torch(path))
        return model
    torch.manual_seed(seed)
    data = load_split("train")
    steps = epochs * (len(data) // 128)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=steps)
    model.train()
    t0, k = time.perf_counter(), 0
    for e in range(epochs):
        for x, y in batches(data, 128, shuffle=True, seed=seed + e, drop_last=True):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            k += 1
            if k % 100 == 0:
                print(f"  train step {k}/{steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    save_torch(path, model.state_dict())
    return model


def accuracy(model: nn.Module, n: int = 2000) -> float:
    data = load_split("test")
    model.eval()
    with torch.no_grad():
        return float((model(data.images[:n]).argmax(1) == data.labels[:n]).float().mean())


def load_model(checkpoint: str | None, epochs: int) -> nn.Module:
    if checkpoint is None:
        return train_quick(epochs)
    model = M.create_model("resnet20", in_channels=1, num_classes=10)
    state = load_torch(checkpoint)
    model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint")
    p.add_argument("--train-epochs", type=int, default=1)
    p.add_argument("--only-train", action="store_true")
    args = p.parse_args()
    model = load_model(args.checkpoint, args.train_epochs)
    print(f"test accuracy (2000 images): {accuracy(model):.4f}")
    if args.only_train:
        return


if __name__ == "__main__":
    main()
