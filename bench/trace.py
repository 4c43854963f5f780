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
from hawq.artifacts import load_torch, save_torch
from hawq.data import batches, load_split
from hawq.hessian import TraceResult, estimate_traces

CACHE = Path(os.environ.get("HAWQ_BENCH_CACHE", "/tmp/hawq_bench"))
DATA_DIR: str | None = None  # --data-dir
MAX_IMAGES = 4096  # --max-images


def _split(name: str):
    return load_split(name, DATA_DIR)


def train_quick(epochs: int = 1, seed: int = 0, path: Path | None = None, device: str = "cpu") -> nn.Module:
    """ResNet-20 trained `epochs` epochs with SGD+cosine (a stand-in until the pipeline caches one)."""
    path = path or CACHE / f"resnet20_fmnist_e{epochs}_s{seed}.pt"
    model = M.create_model("resnet20", in_channels=1, num_classes=10)
    if path.exists():
        model.load_state_dict(load_torch(path))
        return model
    torch.manual_seed(seed)
    data = _split("train")
    model.to(device)
    steps = epochs * (len(data) // 128)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=steps)
    model.train()
    t0, k = time.perf_counter(), 0
    for e in range(epochs):
        for x, y in batches(data, 128, shuffle=True, seed=seed + e, drop_last=True):
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            k += 1
            if k % 100 == 0:
                print(f"  train step {k}/{steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    model.cpu()
    save_torch(path, model.state_dict())
    return model


def accuracy(model: nn.Module, n: int = 2000) -> float:
    data = _split("test")
    model.eval()
    with torch.no_grad():
        return float((model(data.images[:n]).argmax(1) == data.labels[:n]).float().mean())


def load_model(checkpoint: str | None, epochs: int, device: str = "cpu") -> nn.Module:
    if checkpoint is None:
        return train_quick(epochs, device=device)
    model = M.create_model("resnet20", in_channels=1, num_classes=10)
    state = load_torch(checkpoint)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a run's fp32.pt or the cache
        state = state["state_dict"]
    elif isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    model.load_state_dict(state)
    return model


def stream(seed: int, batch_size: int = 256):
    """Shuffled training images, the order fixed by `seed` (the caller's job in the pipeline)."""
    return batches(_split("train"), batch_size, shuffle=True, seed=seed)


def run_estimator(model: nn.Module, method: str, seed: int, **kw) -> TraceResult:
    """One estimation to the issue-3 target (5% on every layer with >= 1% of the total trace)."""
    kw = {"rel_tol": 0.05, "min_share": 0.01, "max_images": MAX_IMAGES, "progress": False, **kw}
    return estimate_traces(model, stream(seed), method=method, seed=seed, **kw)


def two_seed_traces(
    model: nn.Module, method: str = "auto", seeds: tuple[int, int] = (0, 1), **kw
) -> tuple[TraceResult, TraceResult]:
    """Traces from two seeds (data order and estimator randomness both differ): for rank agreement and
    for checking that the allocator picks the same plan from both."""
    return run_estimator(model, method, seeds[0], **kw), run_estimator(model, method, seeds[1], **kw)


def spearman(a: TraceResult, b: TraceResult) -> float:
    return float(spearmanr([lt.trace for lt in a.layers], [lt.trace for lt in b.layers]).statistic)


def _timeit(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def hvp_cost(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reps: int = 3) -> dict[str, float]:
    """Seconds of a forward+backward, of the create_graph gradient, and of one HVP reusing it."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    state = {}

    def graph():
        state["g"] = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)

    def hvp():
        v = [torch.randint_like(p, 2) * 2 - 1 for p in params]
        torch.autograd.grad(state["g"], params, v, retain_graph=True)

    t_fb = _timeit(fwd_bwd, reps)
    t_graph = _timeit(graph, reps)
    t_hvp = _timeit(hvp, reps)
    model.zero_grad(set_to_none=True)
    return {"fwd_bwd_s": t_fb, "grad_graph_s": t_graph, "hvp_s": t_hvp, "hvp_over_fwd_bwd": t_hvp / t_fb}


def pyhessian_trace_s(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n_probes: int) -> float:
    from pyhessian import hessian  # bench-only dependency

    t = time.perf_counter()
    h = hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    h.trace(maxIter=n_probes, tol=0.0)  # tol=0: exactly n_probes probes
    return time.perf_counter() - t


def variance_study(model: nn.Module, n_images: int = 512, chunk: int = 64) -> dict:
    """Per-image values of each per-sample estimator on the same images: spread and seconds per image.

    Images needed for 5% on layer l: (std_l / (0.05 mean_l))^2; predicted time = that x seconds/image,
    maxed over the layers holding >= 1% of the total trace.
    """
    from hawq.hessian.persample import persample_traces
    from hawq.quant import quantizable_layers

    model.eval()
    mods = dict(model.named_modules())
    names = quantizable_layers(model)
    modules = [mods[n] for n in names]
    data = stream(0, chunk)
    xs = [next(data) for _ in range(n_images // chunk)]
    out = {}
    for mode in ("exact", "mc_fisher", "mc_fisher_is"):
        gen = torch.Generator().manual_seed(0)
        t = time.perf_counter()
        vals = torch.cat([persample_traces(model, modules, x, mode, gen)[0] for x, _ in xs])
        per_image_s = (time.perf_counter() - t) / n_images
        mean, std = vals.mean(0), vals.std(0)
        full = mean * torch.tensor([m.weight.numel() for m in modules])
        big = full >= 0.01 * full.sum()
        need = ((std / (0.05 * mean)) ** 2)[big].max().item()
        out[mode] = {
            "s_per_image": per_image_s,
            "images_for_5pct": round(need),
            "predicted_s": need * per_image_s,
            "rel_std_per_image": [round(v, 3) for v in (std / mean).tolist()],
        }
    return out


def plans_agree(model: nn.Module, a: TraceResult, b: TraceResult, budget_bits: float = 3.0) -> bool:
    """Whether both seeds' traces give the same plan at the default budget (uniform 3-bit size)."""
    from hawq.alloc import best_plan, default_fixed, sensitivity_table
    from hawq.pipeline import uniform_size_bytes

    plans = []
    for r in (a, b):
        table = sensitivity_table(model, r.means(), fixed=default_fixed(model), progress=False)
        plans.append(best_plan(table, uniform_size_bytes(table, budget_bits)).w_bits)
    return plans[0] == plans[1]


def summarize(r: TraceResult) -> dict:
    big = [lt for lt in r.layers if lt.trace * lt.n_params >= 0.01 * sum(x.trace * x.n_params for x in r.layers)]
    return {
        "method": r.method,
        "images": r.n_images,
        "backward_or_hvp": r.n_backward,
        "wall_s": round(r.wall_s, 2),
        "converged": r.converged,
        "max_rel_stderr_big_layers": round(max(lt.rel_stderr for lt in big), 4),
        "n_big_layers": len(big),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="state_dict of resnet20(in_channels=1) (default: train and cache)")
    p.add_argument("--train-epochs", type=int, default=1)
    p.add_argument("--only-train", action="store_true")
    p.add_argument("--methods", default="hybrid,mc_fisher_is,mc_fisher,exact,hutchinson")
    p.add_argument("--hutchinson-probes", type=int, default=64, help="probe budget of the Hutchinson run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(CACHE / "trace_bench.json"))
    p.add_argument("--data-dir")
    p.add_argument("--skip-hvp", action="store_true", help="skip the HVP-cost and PyHessian comparison")
    p.add_argument("--study-images", type=int, default=512)
    p.add_argument("--max-images", type=int, default=8192, help="cap of every estimation (as the pipeline default)")
    p.add_argument("--train-device", default="cpu")
    p.add_argument("--study", action="store_true", help="per-image variance of the per-sample estimators")
    args = p.parse_args()
    global DATA_DIR, MAX_IMAGES
    DATA_DIR, MAX_IMAGES = args.data_dir, args.max_images
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint, args.train_epochs, args.train_device)
    print(f"test accuracy (2000 images): {accuracy(model):.4f}; load average {os.getloadavg()[0]:.1f}")
    if args.only_train:
        return
    report: dict = {"threads": args.threads, "load_avg_start": os.getloadavg()[0], "estimators": {}}
    if args.study:
        report["variance_study"] = variance_study(model, args.study_images)
        print("variance study", json.dumps(report["variance_study"]), flush=True)
        _write(args.out, report)
    for method in args.methods.split(","):
        kw = {"max_probes": args.hutchinson_probes} if method == "hutchinson" else {}
        a, b = two_seed_traces(model, method, **kw)
        row = {"seed0": summarize(a), "seed1": summarize(b), "spearman": round(spearman(a, b), 4),
               "same_plan_at_default_budget": plans_agree(model, a, b)}
        report["estimators"][method] = row
        print(method, json.dumps(row), flush=True)
        _write(args.out, report)
    if args.skip_hvp:
        return
    x, y = next(stream(0, 64))
    report["hvp_cost_batch64"] = hvp_cost(model, x, y)
    print("hvp cost", json.dumps(report["hvp_cost_batch64"]))
    n = args.hutchinson_probes
    ours = run_estimator(model, "hutchinson", 0, max_probes=n, chunk_size=64, probes_per_batch=n, max_images=64)
    report["hutchinson_vs_pyhessian"] = {
        "probes": n,
        "ours_one_batch_s": round(ours.wall_s, 2),
        "pyhessian_s": round(pyhessian_trace_s(model, x, y, n), 2),
    }
    print("same probes, one batch of 64:", json.dumps(report["hutchinson_vs_pyhessian"]))
    report["load_avg_end"] = os.getloadavg()[0]
    _write(args.out, report)
    print(f"wrote {args.out}")


def _write(path: str, report: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
