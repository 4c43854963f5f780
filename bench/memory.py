"""Peak memory of Hessian trace estimation against one training step on the same batch (CPU).

Each measurement runs in a fresh subprocess and reports its peak resident set size (getrusage
ru_maxrss), so the numbers are the whole process's, allocator and all:
  idle    model and batch built, nothing run (imports, weights, data)
  train   one SGD step: forward in train mode, cross-entropy, backward, update
  traces  hawq.hessian.estimate_traces on the same batch (one chunk; method as given)

    .venv/bin/python bench/memory.py                      # resnet50, 224 px, batch 8, method auto
    .venv/bin/python bench/memory.py --method exact --batch 2 --num-classes 10
    python bench/memory.py --device cuda                 # GPU: peak torch.cuda allocation instead of RSS

The target (issue 5): traces within 2x the training step's peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _child(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    import hawq.models.paper  # noqa: F401  (registers resnet50 etc.)
    import hawq.models.squeezenext  # noqa: F401
    from hawq.models import create_model

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    model = create_model(args.model, num_classes=args.num_classes).to(dev)
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    y = torch.randint(0, args.num_classes, (args.batch,), device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    extra: dict = {}
    if args.child == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    elif args.child == "traces":
        from hawq.hessian import estimate_traces

        model.eval()
        res = estimate_traces(model, [(x, y)], method=args.method, max_images=args.batch,
                              chunk_size=args.batch, progress=False, seed=0)
        extra = {"method": res.method, "n_layers": len(res.layers), "n_backward": res.n_backward}
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss: KiB on Linux
    wall = time.perf_counter() - t0
    print(json.dumps({"mode": args.child, "peak_mb": peak_mb, "wall_s": wall, **extra}))


def _measure(mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--model", args.model, "--size", str(args.size),
           "--batch", str(args.batch), "--num-classes", str(args.num_classes), "--method", args.method,
           "--threads", str(args.threads), "--device", args.device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--method", default="auto", choices=["auto", "exact", "mc_fisher", "hutchinson"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu (peak RSS) or cuda (peak torch.cuda allocation)")
    p.add_argument("--child", choices=["idle", "train", "traces"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return
    rows = {m: _measure(m, args) for m in ("idle", "train", "traces")}
    idle, train, traces = (rows[m]["peak_mb"] for m in ("idle", "train", "traces"))
    what = "peak RSS" if args.device == "cpu" else "peak CUDA allocation"
    print(f"{args.model} at {args.size} px, batch {args.batch}, {args.num_classes} classes, {args.device}, {what} "
          f"(traces: {rows['traces'].get('method')}, {rows['traces'].get('n_backward')} backward passes)")
    print(f"{'':8s} {'peak MB':>12s} {'above idle':>11s} {'wall s':>8s}")
    for m in ("idle", "train", "traces"):
        r = rows[m]
        print(f"{m:8s} {r['peak_mb']:12.0f} {r['peak_mb'] - idle:11.0f} {r['wall_s']:8.2f}")
    ratio = traces / train
    ratio_above = (traces - idle) / max(train - idle, 1e-9)
    print(f"traces / train peak: {ratio:.2f}x (above idle: {ratio_above:.2f}x); target <= 2x: "
          f"{'met' if ratio <= 2 else 'NOT met'}")


if __name__ == "__main__":
    main()
