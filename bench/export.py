"""onnxruntime CPU latency of ResNet-20 (1 channel, 28x28): full precision against exported QDQ models.

Every model goes through `hawq.export.export_onnx` (batch norm folded in all of them), then runs in an
onnxruntime CPU session with default optimizations. Medians over repeated runs at batch 1 and batch 64;
the table says where the quantized model is not faster. Weights are random: latency does not depend on
their values, only on the bit widths.

    .venv/bin/python bench/export.py                       # fp32, w8a8, w4a8, a mixed 2/3/4/8-bit plan
    .venv/bin/python bench/export.py --plan RUN/plan.json  # also the plan of a run folder
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import hawq
from hawq.export import export_onnx, ort_session, size_breakdown


def mixed_plan(names: list[str]) -> dict[str, dict[str, int]]:
    """First and last layer at 8 bits, the others cycling through 2, 3, 4, 8; inputs at 8 bits."""
    cycle = [2, 3, 4, 8]
    return {n: {"w_bits": 8 if i in (0, len(names) - 1) else cycle[i % 4], "a_bits": 8} for i, n in enumerate(names)}


def build(plan: dict | None, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = hawq.create_model("resnet20", in_channels=1).eval()
    if plan is not None:
        g = torch.Generator().manual_seed(seed)
        hawq.quantize_(model, plan)
        hawq.calibrate_(model, [torch.randn(64, 1, 28, 28, generator=g)])
    return model


def median_ms(sess, x: np.ndarray, repeats: int, warmup: int = 5) -> float:
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", type=Path, help="a run folder's plan.json to time as well")
    parser.add_argument("--repeats", type=int, default=100, help="timed runs at batch 1 (batch 64: a tenth)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    names = hawq.quantizable_layers(hawq.create_model("resnet20", in_channels=1))
    plans: dict[str, dict | None] = {
        "fp32": None,
        "w8a8": {"re:.*": {"w_bits": 8, "a_bits": 8}},
        "w4a8": {"re:.*": {"w_bits": 4, "a_bits": 8}},
        "mixed 2/3/4/8, a8": mixed_plan(names),
    }
    if args.plan is not None:
        from hawq.alloc.plan import Plan

        d = json.loads(args.plan.read_text())
        plans[f"plan {args.plan}"] = Plan.from_dict(d).layers

    rng = np.random.default_rng(args.seed)
    inputs = {b: rng.standard_normal((b, 1, 28, 28)).astype(np.float32) for b in (1, 64)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, plan in plans.items():
            model = build(plan, args.seed)
            path = Path(tmp) / f"{len(rows)}.onnx"
            report = export_onnx(model, path, torch.from_numpy(inputs[1]))
            sess = ort_session(path, threads=args.threads)
            ms = {b: median_ms(sess, x, args.repeats if b == 1 else max(3, args.repeats // 10))
                  for b, x in inputs.items()}
            rows.append((name, report.opset, size_breakdown(path)["file_size_bytes"], ms[1], ms[64]))

    print(f"onnxruntime CPU latency, ResNet-20 1x28x28 ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, threads={args.threads or 'default'}), median ms")
    print(f"{'model':<28}{'opset':>6}{'file KB':>10}{'batch 1':>10}{'batch 64':>10}{'vs fp32 b1':>12}{'b64':>8}")
    base = rows[0]
    for name, opset, size, b1, b64 in rows:
        print(f"{name:<28}{opset:>6}{size / 1024:>10.1f}{b1:>10.3f}{b64:>10.2f}{base[3] / b1:>11.2f}x"
              f"{base[4] / b64:>7.2f}x")
    for name, _, _, b1, b64 in rows[1:]:
        slower = [f"batch {b}" for b, t, t0 in ((1, b1, base[3]), (64, b64, base[4])) if t >= t0]
        if slower:
            print(f"NOT faster than fp32: {name} at {', '.join(slower)}.")
    print("Why: layers with 2-4-bit weights are dequantized to float before a float convolution (no sub-8-bit "
          "kernels), and every quantized input pays a QuantizeLinear/DequantizeLinear pair; only convolutions "
          "whose 8-bit input, INT8 weights and 8-bit output quantizer line up become integer QLinearConv.")


if __name__ == "__main__":
    main()
