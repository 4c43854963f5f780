"""Post-training ablation (issue 16): quantized ResNet-20 before any fine-tuning; writes docs/ptq.md and docs/ptq.json.

Weights only, first/last layer 8 bits, the full test set. Four variants of the steps of `hawq.train.ptq`:
    max-scaled   weights scaled by each channel's largest magnitude, float batch-norm statistics (hawq before)
    clipped      per-channel clip ratio minimising ||Q(W)-W||^2, float batch-norm statistics
    BN re-est.   max-scaled weights, batch-norm statistics re-estimated on 4,096 training images
    both         clipped + BN re-estimation (hawq's default now)
for uniform 4/3/2-bit and HAWQ-V2 plans at the sizes of uniform 4/3/2.5/2.25-bit weights. Each HAWQ-V2 plan
is allocated with the Omega of the quantizer that variant applies (max-scaled or clipped ||Q(W)-W||^2).
Then 4-bit activations with min/max, percentile and error-minimising ranges, and a model without batch norm
(an MLP) with and without bias correction.

    .venv/bin/python bench/ptq.py --threads 1            # ~15 min on 2 shared cores (cached ResNet-20)
    .venv/bin/python bench/ptq.py --quick                # smoke run on 1,000 test images
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

from hawq.alloc import best_plan, make_plan, plan_for_bits, sensitivity_table
from hawq.config import RunConfig
from hawq.data.fashion_mnist import batches
from hawq.hessian import estimate_traces
from hawq.quant import quantizable_layers, quantize_
from hawq.tasks import classification as task
from hawq.train import PostTrainConfig, TrainConfig, evaluate, post_train_, train

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "max-scaled": PostTrainConfig.off(),
    "clipped": PostTrainConfig(bn_images=0),
    "BN re-estimation": PostTrainConfig(weight_range="max"),
    "both": PostTrainConfig(),
}


# the four rows first, then the rest of the design
PLANS = ("uniform:3", "uniform:2", "hawq:3", "hawq:2.5", "uniform:4", "hawq:4", "hawq:2.25")


def uniform_size_bytes(table, bits: float) -> float:
    return (32 * table.other_params + sum(r.n_params * (r.bits[0] if r.fixed else bits) for r in table.layers)) / 8


def score(fp32: nn.Module, plan, data, test, cfg: PostTrainConfig) -> tuple[float, float]:
    """Top-1 of the post-trained plan on `test`, and the seconds the post-training steps took."""
    model = quantize_(copy.deepcopy(fp32), plan)
    t0 = time.perf_counter()
    post_train_(model, lambda: batches(data.train, 256), cfg)
    return evaluate(model, test), time.perf_counter() - t0


def mlp_section(data, test) -> dict:
    """A model without batch norm: 784-256-256-10 ReLU MLP, 1 epoch; every layer at b bits."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                        nn.Linear(256, 10))
    train(mlp, data.train, TrainConfig(n_images=len(data.train), lr=0.05, seed=0), progress=False)
    out = {"fp32": evaluate(mlp, test), "rows": []}
    variants = {"max-scaled": PostTrainConfig.off(),
                "max-scaled + bias correction": PostTrainConfig(weight_range="max", bn_images=0),
                "clipped": PostTrainConfig(bn_images=0, bias_correction=False),
                "clipped + bias correction": PostTrainConfig(bn_images=0)}
    for bits in (4, 3, 2):
        plan = {"re:.*": bits}
        row = {"bits": bits}
        for name, cfg in variants.items():
            m = quantize_(copy.deepcopy(mlp), plan)
            post_train_(m, lambda: batches(data.train, 256), cfg)
            row[name] = evaluate(m, test)
        out["rows"].append(row)
    return out


def main(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    t_start, load0 = time.perf_counter(), os.getloadavg()[0]
    cfg = RunConfig() if a.checkpoint is None else RunConfig(checkpoint=a.checkpoint)
    data = task.load_data(cfg)
    test = data.test.subset(a.test_images) if a.test_images else data.test
    fp32, record = task.full_precision_model(cfg, data, progress=not a.quiet)
    fp32_top1 = evaluate(fp32, test)
    x1 = data.train.images[:1]
    zero = {f: 0.0 for f in quantizable_layers(fp32)}  # sizes and bits of uniform plans need no traces
    sizing = {wr: sensitivity_table(fp32, zero, example_input=x1, weight_range=wr, progress=False)
              for wr in ("max", "mse")}
    tables: dict = {}

    def hawq_tables() -> dict:  # traces only when a HAWQ-V2 row needs them (uniform rows come first)
        if not tables:
            stream = batches(data.train, 128, shuffle=True, seed=1000)
            traces = estimate_traces(fp32, stream, method="exact", rel_tol=1e-9, max_images=a.trace_images,
                                     seed=0, progress=not a.quiet).means()
            tables.update({wr: sensitivity_table(fp32, traces, example_input=x1, weight_range=wr, progress=False)
                           for wr in ("max", "mse")})
        return tables

    def plan_of(name: str) -> dict:
        kind, _, b = name.partition(":")
        if kind == "uniform":
            return {wr: make_plan(t, plan_for_bits(t, int(b)).w_bits) for wr, t in sizing.items()}
        return {wr: best_plan(t, uniform_size_bytes(t, float(b))) for wr, t in hawq_tables().items()}

    def title(name: str) -> str:
        kind, _, b = name.partition(":")
        return f"uniform {b}-bit" if kind == "uniform" else f"HAWQ-V2, uniform-{b}-bit budget"

    plans = {}
    rows, ptq_s = [], []
    run = {"argv": ["bench/ptq.py", *sys.argv[1:]], "fp32_top1": fp32_top1, "source": record["source"],
           "test_images": len(test), "trace_images": a.trace_images, "bn_images": a.bn_images,
           "rows": rows, "act_rows": [], "mlp": None,
           "ptq_s": ptq_s, "threads": a.threads,
           "machine": f"{platform.platform()}, {os.cpu_count()} logical cores, torch {torch.__version__}"}
    out = Path(a.out)
    if a.add_to:  # keep the tables of an earlier run of the same model and settings that this run does not measure
        old = json.loads(Path(a.add_to).read_text())
        if (old["source"], old["fp32_top1"], old["test_images"]) != (run["source"], fp32_top1, len(test)):
            sys.exit(f"bench/ptq.py: {a.add_to} measured another model or test set; rerun without --add-to")
        keep = {"rows": not a.plans, "act_rows": not a.act_plans, "mlp": a.no_mlp}
        run.update({k: old[k] for k, kept in keep.items() if kept})
        if not a.plans:
            ptq_s.extend(old["ptq_s"])
        run["argv_earlier"] = old.get("argv_earlier") or old["argv"]

    def save() -> None:  # after every section, so that a stopped run still leaves its tables
        run.update(wall_s=time.perf_counter() - t_start, load=[load0, os.getloadavg()[0]],
                   finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(run, indent=1))
        out.write_text(render(run, out.with_suffix(".json").name))

    for key in a.plans:  # in the order given: a stopped run keeps the first rows
        by_range = plans[key] = plan_of(key)
        row = {"plan": title(key), "size_kib": {wr: p.size_bytes / 1024 for wr, p in by_range.items()},
               "w_bits": {wr: p.w_bits for wr, p in by_range.items()}}
        for vname, vcfg in VARIANTS.items():
            vcfg = PostTrainConfig(**{**vcfg.to_dict(), "bn_images": min(vcfg.bn_images, a.bn_images)})
            row[vname], s = score(fp32, by_range[vcfg.weight_range], data, test, vcfg)
            ptq_s.append(s)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "w_bits"}), file=sys.stderr, flush=True)
        save()
    save()
    for key in a.act_plans:
        t = sizing["mse"]
        a_bits = {r.fqn: r.bits[0] if r.fixed else 4 for r in t.layers}
        by_range = plans.get(key) or plan_of(key)
        pa = make_plan(t, by_range["mse"].w_bits, a_bits)
        pm = make_plan(sizing["max"], by_range["max"].w_bits, a_bits)
        row = {"plan": title(key) + ", 4-bit activations",
               "max-scaled, min/max": score(fp32, pm, data, test, PostTrainConfig.off())[0]}
        for ar in ("minmax", "percentile", "mse"):
            row[f"both, {ar}"] = score(fp32, pa, data, test, PostTrainConfig(act_range=ar))[0]
        run["act_rows"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        save()
    if not a.no_mlp:
        run["mlp"] = mlp_section(data, test)
        save()
    for key in a.sweep_plans if a.bn_sweep else ():
        by_range = plans.get(key) or plan_of(key)
        row = {"plan": title(key), "size_kib": by_range["mse"].size_bytes / 1024}
        for n in a.bn_sweep:
            t0 = time.perf_counter()
            row[str(n)] = score(fp32, by_range["mse"], data, test, PostTrainConfig(bn_images=n))[0]
            row[f"{n}_s"] = time.perf_counter() - t0
        run.setdefault("bn_sweep", []).append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        save()
    print(render(run, out.with_suffix(".json").name))


def _size(row: dict) -> str:
    a, b = row["size_kib"]["max"], row["size_kib"]["mse"]
    return f"{b:.1f}" if abs(a - b) < 0.05 else f"{a:.1f} / {b:.1f}"


def render(run: dict, raw: str) -> str:
    n = run["test_images"]
    L = ["# Post-training steps: quantized models before fine-tuning", "",
         f"Generated by `.venv/bin/python {' '.join(run['argv'])}` on {run['finished']}"
         + (f", added to the tables of `.venv/bin/python {' '.join(run['argv_earlier'])}`" if run.get("argv_earlier")
            else "") + " (raw records: "
         f"[{raw}]({raw})). ResNet-20 on Fashion-MNIST ({run['source']}), full precision "
         f"{run['fp32_top1']:.2f}%; top-1 on {n} test images, no gradient step; weights only, first and last "
         "layer at 8 bits. HAWQ-V2 plans from exact traces on "
         f"{run['trace_images']} training images, allocated with the Omega of the quantizer each column applies "
         "(size: max-scaled / clipped plan when they differ).", "",
         *([f"**This is a REDUCED run** ({n} of 10000 test images, {run.get('bn_images', 4096)} batch-norm images, "
            "traces on " + str(run["trace_images"]) + " images" + (", the model given by --checkpoint" if "checkpoint"
            in run["source"] else "") + "); the full design is `.venv/bin/python bench/ptq.py --threads 1`.", ""]
           if n < 10000 or run.get("bn_images", 4096) < 4096 else []),
         "- max-scaled: each weight channel scaled by its largest magnitude, float batch-norm statistics "
         "(hawq before issue 16)",
         "- clipped: per-channel clip ratio (a whole percent of the largest magnitude, 6%..100%, searched every "
         "fifth percent then the eight around the best) minimising ||Q(W)−W||²",
         f"- BN re-estimation: batch-norm running statistics re-estimated in train mode on the first "
         f"{run.get('bn_images', 4096)} training images, weights frozen",
         "- both: clipped + BN re-estimation (`hawq run`'s default now; `--weight-range max --bn-images 0` is the "
         "old behaviour)", "",
         "| plan | size KiB | max-scaled | clipped | BN re-estimation | both |", "|---|---|---|---|---|---|"]
    for r in run["rows"]:
        L.append(f"| {r['plan']} | {_size(r)} | " + " | ".join(f"{r[v]:.2f}" for v in VARIANTS) + " |")
    if run["act_rows"]:
        L += ["", "## 4-bit activations (weights as above, both weight steps)", "",
          "Activation ranges over 2,048 training images: min/max; the 0.01%/99.99% percentiles; or the clip "
          "ratio of [min, max] that minimises the mean squared error of Q(x).", "",
          "| plan | max-scaled, min/max (before) | both, min/max | both, percentile | both, mse |",
          "|---|---|---|---|---|"]
    for r in run["act_rows"]:
        L.append(f"| {r['plan']} | " + " | ".join(f"{r[k]:.2f}" for k in list(r)[1:]) + " |")
    m = run["mlp"]
    if m:
        L += ["", "## A model without batch norm: bias correction", "",
          f"784-256-256-10 ReLU MLP trained one epoch ({m['fp32']:.2f}% in float), every layer at b bits. Bias "
          "correction subtracts E_x[(Q(W)−W)x] per output channel from each layer's bias (x: the layer's input "
          "in the quantized model, 1,024 training images).", "",
          "| bits | " + " | ".join(k for k in m["rows"][0] if k != "bits") + " |",
          "|---|" + "---|" * (len(m["rows"][0]) - 1)]
        for r in m["rows"]:
            L.append(f"| {r['bits']} | " + " | ".join(f"{v:.2f}" for k, v in r.items() if k != "bits") + " |")
    sweep = run.get("bn_sweep") or []
    if sweep:
        ns = [k for k in sweep[0] if k not in ("plan", "size_kib") and not k.endswith("_s")]
        L += ["", "## How many images batch norm is re-estimated on", "",
              "Both steps (clipped weights, BN re-estimation) with the statistics averaged over the first N training "
              "images; the other columns of this page use N = " + str(run.get("bn_images", 4096)) + " (`hawq run "
              "--bn-images N`, default 4096). Seconds: post-training steps plus the evaluation on the test set.", "",
              "| plan | size KiB | " + " | ".join(f"N = {n}" for n in ns) + " | " + " | ".join(
                  f"s (N = {n})" for n in ns) + " |", "|---|---|" + "---|" * (2 * len(ns))]
        for r in sweep:
            L.append(f"| {r['plan']} | {r['size_kib']:.1f} | " + " | ".join(f"{r[n]:.2f}" for n in ns) + " | "
                     + " | ".join(f"{r[n + '_s']:.0f}" for n in ns) + " |")
    s = sorted(run["ptq_s"])
    L += ["", "## Cost", "",
          f"- Post-training steps per model: median {s[len(s) // 2]:.1f} s (max {s[-1]:.1f} s), including the "
          "clip search; total run {:.1f} min with {} thread(s) on {} (load average {:.1f} at start, {:.1f} at "
          "end: the machine was shared with other jobs, so times are inflated).".format(
              run["wall_s"] / 60, run["threads"], run["machine"], *run["load"]), ""]
    return "\n".join(L)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1,000 test images, 256 trace images")
    ap.add_argument("--test-images", type=int, default=None, help="first N test images (default: all)")
    ap.add_argument("--trace-images", type=int, default=2048)
    ap.add_argument("--checkpoint", help="fp32 checkpoint (default: the hawq model cache)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "ptq.md"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plans", nargs="*", default=list(PLANS), help="rows, in order (uniform:B or hawq:B)")
    ap.add_argument("--act-plans", nargs="*", default=["uniform:4", "hawq:3"],
                    help="plans of the 4-bit activation table")
    ap.add_argument("--bn-images", type=int, default=4096, help="images of the batch-norm re-estimation")
    ap.add_argument("--no-mlp", action="store_true", help="skip the model without batch norm")
    ap.add_argument("--bn-sweep", type=int, nargs="*", default=[4096, 16384, 60000],
                    help="batch-norm image counts of the last table (both steps); none: skip it")
    ap.add_argument("--sweep-plans", nargs="*", default=["hawq:3", "hawq:2.5", "uniform:3"],
                    help="plans of the batch-norm image table")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--add-to", metavar="RUN_JSON",
                    help="keep this earlier run's tables for the sections not measured now (empty --plans etc.)")
    ap.add_argument("--render", metavar="RUN_JSON", help="only rewrite --out from a run's raw JSON (no measuring)")
    a = ap.parse_args()
    if a.quick:
        a.test_images, a.trace_images = a.test_images or 1000, 256
        a.bn_sweep = [256, 1024] if a.bn_sweep == [4096, 16384, 60000] else a.bn_sweep
    return a


if __name__ == "__main__":
    args = parse()
    if args.render:
        Path(args.out).write_text(render(json.loads(Path(args.render).read_text()), Path(args.render).name))
    else:
        main(args)
