"""Detection bench: RetinaNet (tiny backbone) on the Fashion-MNIST detection set, four plans at equal BOPs.

For each of two BOPs budgets, those of uniform W4A8 and of uniform W4A4 (first conv and both output convs
stay at W8A8 in every plan):
  uniform        every free layer at 4-bit weights and the budget's activation bits
  hawq-w         HAWQ weight bits (Hessian traces of the detection loss) with the same uniform activations
  hawq-joint     HAWQ weight and activation bits together (a in {4, 8}), exact solver, same BOPs budget
Every plan is calibrated and fine-tuned the same way (same images, epochs, learning rate), then scored by
COCO mAP (pycocotools). Writes a markdown table to --out and prints it.

    .venv/bin/python bench/detection.py --threads 1     # measured: 14 min wall, 7.5 min CPU (load ~4)
    .venv/bin/python bench/detection.py --quick         # a smoke run on a small set (~1.5 min)
On a busy 2-core machine one torch thread is faster than two (the threads of small ops wait on each other).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from hawq import quantize_
from hawq.alloc import (
    MB,
    Plan,
    activation_omega,
    activation_perturbations,
    best_joint_plan,
    make_plan,
    sensitivity_table,
)
from hawq.artifacts import load_torch, save_torch
from hawq.data.detection_synth import detection_loader, load_detection_split, make_detection_set
from hawq.hessian import estimate_activation_traces, estimate_traces
from hawq.models.retinanet_tiny import create_detector
from hawq.tasks.detection import (
    TRAIN_DEFAULTS,
    detection_loss_fn,
    evaluate_map,
    fixed_layers,
    hessian_batches,
    train_detector,
)
from hawq.train import PostTrainConfig, post_train_


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = TRAIN_DEFAULTS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/detection.md", help="markdown report (default docs/detection.md)")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "hawq" / "bench-detection"),
                   help="data set and full-precision checkpoint cache")
    p.add_argument("--n-train", type=int, default=d.n_train)
    p.add_argument("--n-val", type=int, default=d.n_val)
    p.add_argument("--epochs", type=int, default=d.epochs, help="full-precision training epochs")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--ft-epochs", type=int, default=d.ft_epochs, help="fine-tuning epochs of every plan")
    p.add_argument("--ft-lr", type=float, default=d.ft_lr)
    p.add_argument("--trace-images", type=int, default=d.trace_images, help="images for the Hessian traces")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="small set, 2 epochs: checks that the bench runs")
    p.add_argument("--ptq", choices=("on", "off"), default="on",
                   help="post-training steps before the 'before fine-tuning' score and before fine-tuning: on = "
                        "clipped weight ranges, batch-norm re-estimation, --act-range (hawq.train.ptq); off = "
                        "max-scaled weights, float statistics, min/max activations")
    p.add_argument("--act-range", choices=("minmax", "percentile", "mse"), default="minmax")
    p.add_argument("--before-only", action="store_true",
                   help="no fine-tuning: score every plan before fine-tuning under each post-training variant and "
                        "write that table into --out's 'Before fine-tuning' section")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_val, args.epochs, args.ft_epochs, args.trace_images = 256, 64, 2, 1, 64
    return args


def full_precision(args: argparse.Namespace, train, progress: bool) -> tuple[torch.nn.Module, float]:
    """Train (or load from --work) the full-precision detector; returns it and the training seconds."""
    ident = {"n_train": args.n_train, "epochs": args.epochs, "lr": args.lr, "seed": args.seed,
             "config": create_detector().config.to_dict()}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(args.work) / f"fp32-{key}.pt"
    model = create_detector(seed=args.seed)
    if path.exists():
        model.load_state_dict(load_torch(path)["state_dict"])
        return model.eval(), float("nan")
    t0 = time.perf_counter()
    loader = detection_loader(train, TRAIN_DEFAULTS.batch_size, shuffle=True, seed=args.seed, flip=True)
    train_detector(model, loader, args.epochs, args.lr, seed=args.seed, progress=progress)
    seconds = time.perf_counter() - t0
    save_torch(path, {"state_dict": model.state_dict(), "train": ident, "train_s": seconds})
    return model.eval(), seconds


def plans_at_equal_bops(table, act_omega: dict, fixed: dict[str, int]) -> dict[str, Plan]:
    free = [f for f in table.fqns if f not in fixed]
    plans = {}
    for a in (8, 4):
        uniform = make_plan(table, {f: fixed.get(f, 4) for f in table.fqns},
                            {f: fixed.get(f, a) for f in table.fqns}, act_omega)
        budget = uniform.bops
        no_act = {f: {a: 0.0} for f in free}
        plans[f"W4A{a} uniform"] = uniform
        w_only = best_joint_plan(table, no_act, a_bits=(a,), budget_bops=budget)
        plans[f"W4A{a} budget: HAWQ weights, A{a}"] = make_plan(table, w_only.w_bits, w_only.a_bits, act_omega)
        plans[f"W4A{a} budget: HAWQ joint"] = best_joint_plan(table, act_omega, a_bits=(4, 8), budget_bops=budget)
    return plans


def post_trained(fp32, plan: Plan, train, ptq: PostTrainConfig) -> torch.nn.Module:
    """The plan on a copy of fp32 after the post-training steps, calibrated on 8 batches of 32 training images."""
    model = quantize_(copy.deepcopy(fp32), plan)
    post_train_(model, lambda: ((x,) for x, _ in detection_loader(train, 32)), ptq)
    return model


def ptq_config(ptq: str, act_range: str = "minmax") -> PostTrainConfig:
    return PostTrainConfig(act_range=act_range) if ptq == "on" else PostTrainConfig.off()


def run_plan(fp32, plan: Plan, train, val, args, progress: bool) -> dict:
    model = post_trained(fp32, plan, train, ptq_config(args.ptq, args.act_range))
    before = evaluate_map(model, detection_loader(val, 100))
    t0 = time.perf_counter()
    loader = detection_loader(train, TRAIN_DEFAULTS.batch_size, shuffle=True, seed=args.seed + 2, flip=True)
    train_detector(model, loader, args.ft_epochs, args.ft_lr, seed=args.seed, progress=progress)
    after = evaluate_map(model, detection_loader(val, 100))
    return {"before": before, "after": after, "ft_s": time.perf_counter() - t0}


def markdown(args, fp, rows: list[dict], timing: dict[str, float], traces) -> str:
    load = os.getloadavg()
    lines = [
        "# Detection: RetinaNet (tiny backbone) on Fashion-MNIST canvases",
        "",
        f"Set: {args.n_train} train / {args.n_val} val canvases of 96x96, 1-4 items each (seed {args.seed}). "
        f"Full precision: {args.epochs} epochs, lr {args.lr}. Every plan: calibrated on 256 images, then "
        f"fine-tuned {args.ft_epochs} epochs at lr {args.ft_lr} (same images and order). First conv and both "
        "output convs at W8A8 in every plan. Hessian traces: Hutchinson on the detection loss (focal + "
        f"smooth L1), {traces.n_images} images. mAP is COCO AP@[.50:.95], mAP@0.5 AP@.50 (pycocotools).",
        "",
        "| plan | BOPs (G/image) | weights (KB) | mAP | mAP@0.5 | mAP before fine-tuning |",
        "|---|---:|---:|---:|---:|---:|",
        f"| float32 | - | {fp['size_kb']:.1f} | {100 * fp['map']:.1f} | {100 * fp['map50']:.1f} | - |",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['bops'] / 1e9:.3f} | {r['size_kb']:.1f} | {100 * r['after']['map']:.1f} | "
                     f"{100 * r['after']['map50']:.1f} | {100 * r['before']['map']:.1f} |")
    lines += ["", "Bits per layer (w/a):", "", "| layer | " + " | ".join(r["name"] for r in rows) + " |",
              "|---|" + "---|" * len(rows)]
    for f in rows[0]["plan"]["layers"]:
        cells = [f"{r['plan']['layers'][f]['w_bits']}/{r['plan']['layers'][f]['a_bits']}" for r in rows]
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    lines += ["", "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timing.items())
              + f"; load average at the end {load[0]:.1f} (the 2-core machine was shared).",
              "", "Command: `.venv/bin/python bench/detection.py" + (" --quick" if args.quick else "")
              + ("" if args.threads is None else f" --threads {args.threads}") + "`", ""]
    return "\n".join(lines)


BEFORE_VARIANTS = {"max-scaled, float BN, min/max (before issue 16)": PostTrainConfig.off(),
                   "clipped + BN re-estimation, min/max": PostTrainConfig(),
                   "clipped + BN re-estimation, percentile": PostTrainConfig(act_range="percentile"),
                   "clipped + BN re-estimation, mse": PostTrainConfig(act_range="mse")}
SECTION = "## Before fine-tuning: post-training steps"


def before_only(args, fp32, plans: dict[str, Plan], train, val, timing: dict) -> None:
    """mAP / mAP@0.5 of every plan before fine-tuning, per post-training variant; a section of --out."""
    t0 = time.perf_counter()
    rows = []
    for name, plan in plans.items():
        if not name.startswith("W4A4"):  # at W4A8 every plan is within noise of float before fine-tuning
            continue
        row = {"name": name}
        for vname, cfg in BEFORE_VARIANTS.items():
            row[vname] = evaluate_map(post_trained(fp32, plan, train, cfg), detection_loader(val, 100))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    timing["before-only plans"] = time.perf_counter() - t0
    lines = [SECTION, "",
             f"`.venv/bin/python bench/detection.py --before-only{' --quick' if args.quick else ''}"
             f"{'' if args.threads is None else f' --threads {args.threads}'}` (same model, traces and plans as "
             "above; no gradient step). Cells: mAP / mAP@0.5 on the val canvases. Post-training steps "
             "(`hawq.train.ptq`): weight channels clipped to minimise ||Q(W)−W||², batch-norm statistics of the "
             f"backbone re-estimated on the {args.n_train} training canvases, activation ranges from 256 training "
             "canvases by min/max, the 0.01%/99.99% percentiles, or the error-minimising clip.", "",
             "| plan | " + " | ".join(BEFORE_VARIANTS) + " |", "|---|" + "---:|" * len(BEFORE_VARIANTS)]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(
            f"{100 * r[v]['map']:.1f} / {100 * r[v]['map50']:.1f}" for v in BEFORE_VARIANTS) + " |")
    lines += ["", f"Wall time {timing['before-only plans']:.0f} s for these scores; load average at the end "
              f"{os.getloadavg()[0]:.1f} (the 2-core machine was shared).", ""]
    out = Path(args.out)
    old = out.read_text() if out.exists() else ""
    head = old.split(SECTION)[0].rstrip() if old else ""
    out.write_text((head + "\n\n" if head else "") + "\n".join(lines))
    (Path(args.work) / "before_only.json").write_text(json.dumps(rows, indent=2, default=str))
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    progress = not args.quiet
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    paths = make_detection_set(Path(args.work) / f"set-{args.n_train}-{args.n_val}-{args.seed}",
                               n_train=args.n_train, n_val=args.n_val, seed=args.seed)
    train, val = load_detection_split(paths, "train"), load_detection_split(paths, "val")
    timing["data"] = time.perf_counter() - t0
    fp32, timing["fp32 training"] = full_precision(args, train, progress)
    fp = evaluate_map(fp32, detection_loader(val, 100))

    t0 = time.perf_counter()
    fixed = fixed_layers(fp32)
    batches = lambda: hessian_batches(detection_loader(train, 64, shuffle=True, seed=args.seed + 1))  # noqa: E731
    opts = {"loss": detection_loss_fn(fp32), "method": "hutchinson", "max_images": args.trace_images,
            "seed": args.seed, "progress": progress}
    traces = estimate_traces(fp32, batches(), **opts)
    act_traces = estimate_activation_traces(fp32, batches(), **opts)
    timing["traces"] = time.perf_counter() - t0
    w_traces = {lt.fqn: max(lt.trace, 0.0) for lt in traces.layers}
    table = sensitivity_table(fp32, w_traces, fixed=fixed, example_input=val.images[:4], progress=False)
    pert = activation_perturbations(fp32, detection_loader(train, 32), list(table.fqns), (4, 8), n_batches=8)
    act_omega = activation_omega({lt.fqn: lt.trace for lt in act_traces.layers}, pert)
    fp["size_kb"] = 4 * sum(p.numel() for p in fp32.parameters()) / 1024

    if args.before_only:
        return before_only(args, fp32, plans_at_equal_bops(table, act_omega, fixed), train, val, timing)
    rows = []
    t0 = time.perf_counter()
    for name, plan in plans_at_equal_bops(table, act_omega, fixed).items():
        res = run_plan(fp32, plan, train, val, args, progress)
        rows.append({"name": name, "bops": plan.bops, "size_kb": plan.size_bytes / 1024, "omega": plan.omega,
                     "plan": plan.to_dict(), **res})
        print(f"{name}: mAP {100 * res['after']['map']:.1f}, mAP@0.5 {100 * res['after']['map50']:.1f} "
              f"(before fine-tuning {100 * res['before']['map']:.1f}), {plan.bops / 1e9:.3f} GBOPs, "
              f"{plan.size_bytes / MB:.4f} MB", file=sys.stderr)
    timing["plans (calibrate + fine-tune + eval)"] = time.perf_counter() - t0
    text = markdown(args, fp, rows, timing, traces)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    (Path(args.work) / "results.json").write_text(json.dumps({"fp32": fp, "plans": rows, "timing": timing},
                                                             indent=2, default=str))
    print(text)


if __name__ == "__main__":
    main()
