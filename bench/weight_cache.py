"""What keeping the quantized weight between gradient-free forwards saves (hawq.quant.modules.quant_weight).

A quantized model's evaluation forward with the cache on and off, alternating, `--repeats` times each; prints
median seconds, the ratio, and whether both give the same outputs. Models: torchvision resnet50 (random
weights, 1000 classes) at 64 px, batch 8, and the default ResNet-20 (bundled or cached) at batch 1000; uniform
4-bit weights with the MSE clip search (the default weight range).

    .venv/bin/python bench/weight_cache.py [--repeats 3] [--batches 4]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torchvision

from hawq.config import RunConfig
from hawq.quant import modules, quantizable_layers, quantize_
from hawq.tasks import classification as task


def _time(model, xs) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    with torch.no_grad():
        outs = [model(x) for x in xs]
    return time.perf_counter() - t0, torch.cat(outs)


def measure(name: str, fp32, xs, repeats: int) -> None:
    plan = {n: 4 for n in quantizable_layers(fp32)}
    secs: dict[bool, list[float]] = {True: [], False: []}
    outs: dict[bool, torch.Tensor] = {}
    for r in range(repeats):
        for on in ((True, False) if r % 2 == 0 else (False, True)):  # the order alternates too
            modules.CACHE_QUANTIZED_WEIGHTS = on
            model = quantize_(copy.deepcopy(fp32), plan).eval()
            s, out = _time(model, xs)
            secs[on].append(s)
            outs[on] = out
    modules.CACHE_QUANTIZED_WEIGHTS = True
    on, off = statistics.median(secs[True]), statistics.median(secs[False])
    same = torch.equal(outs[True], outs[False])
    print(f"{name}: {len(xs)} batches of {len(xs[0])}: cache on {on:.2f} s, off {off:.2f} s, off/on {off / on:.2f}x; "
          f"outputs {'identical' if same else 'DIFFERENT'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, default=4)
    a = ap.parse_args()
    print(f"{os.cpu_count()} cores, {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}; "
          f"{a.repeats} repeats, alternating; medians")
    torch.manual_seed(0)
    r50 = torchvision.models.resnet50(weights=None).eval()
    measure("resnet50 (64 px)", r50, [torch.randn(8, 3, 64, 64) for _ in range(a.batches)], a.repeats)
    cfg = RunConfig()
    data = task.load_data(cfg)
    r20, _ = task.full_precision_model(cfg, data, progress=False)
    measure("resnet20 (Fashion-MNIST)", r20, [data.test.images[i * 1000:(i + 1) * 1000] for i in range(a.batches)],
            a.repeats)


if __name__ == "__main__":
    main()
