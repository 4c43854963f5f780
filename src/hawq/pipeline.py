"""The stages of a run wired together over a run folder (DESIGN.md: data flow and artifacts).

    prepare -> fp32 -> trace -> allocate -> finetune -> report
Each stage reads the artifacts of the stages before it from the folder, so it can be rerun alone.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hawq import classification as task
from hawq.alloc import (
    MB,
    Plan,
    SensitivityTable,
    best_plan,
    default_fixed,
    fp32_size_bytes,
    min_size_bytes,
    pareto_frontier,
    plan_for_bits,
    sensitivity_table,
    size_report,
    sizing_table,
)
from hawq.config import RunConfig
from hawq.data.fashion_mnist import batches
from hawq.hessian import estimate_traces, weights_hash
from hawq.io import read_json, save_torch, write_json
from hawq.quant import calibrate_, quantize_
from hawq.runfolder import RunFolder
from hawq.train import TrainConfig, evaluate, train


@dataclass
class Context:
    cfg: RunConfig
    run: RunFolder
    progress: bool = True

    def log(self, msg: str) -> None:
        if self.progress:
            print(f"[hawq] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- checks
def budget_bytes(cfg: RunConfig, table: SensitivityTable) -> float:
    """The size budget in bytes: --budget-mb, --compression, or the size of uniform --budget-bits weights."""
    if cfg.budget_mb is not None:
        return cfg.budget_mb * MB
    if cfg.compression is not None:
        return fp32_size_bytes(table) / cfg.compression
    return uniform_size_bytes(table, cfg.budget_bits)


def uniform_size_bytes(table: SensitivityTable, bits: float) -> float:
    """Size with every free layer at `bits` (may be fractional, e.g. 2.5) and fixed layers at their bits."""
    total = 32 * table.other_params
    for row in table.layers:
        total += row.n_params * (row.bits[0] if row.fixed else bits)
    return total / 8


def _fixed(cfg: RunConfig, model: nn.Module) -> dict[str, int]:
    return default_fixed(model) if cfg.keep_first_last else {}


def check_budget(cfg: RunConfig, model: nn.Module, example: torch.Tensor) -> None:
    """Fail before anything is written when no plan can meet the budget."""
    table = sizing_table(model, bits=cfg.w_bits, fixed=_fixed(cfg, model))
    budget = budget_bytes(cfg, table)
    smallest = min_size_bytes(table)
    if budget < smallest:
        raise ValueError(
            f"budget {budget / MB:.4f} MB is below the smallest feasible size {smallest / MB:.4f} MB "
            f"(every layer at its lowest bit width): raise --budget-mb"
        )


def prepare(cfg: RunConfig, out: str | Path, progress: bool = True) -> tuple[Context, task.ClassificationData]:
    """Validate everything that can be validated, then write config.json."""
    run = RunFolder(out)
    run.check_config(cfg)
    data = task.load_data(cfg)
    model = task.build_model(cfg)
    check_budget(cfg, model, data.train.images[:1])
    if cfg.checkpoint is not None:
        task.load_state_into(model, cfg.checkpoint)
    run.write_config(cfg)
    return Context(cfg, run, progress), data


def open_run(out: str | Path, progress: bool = True, **overrides) -> tuple[Context, task.ClassificationData]:
    run = RunFolder(out)
    cfg = run.read_config()
    if overrides:
        new = cfg.replace(**overrides)
        if new.fingerprint() != cfg.fingerprint():
            raise ValueError("these options change the run's identity: start a new run with `hawq run --out NEW`")
        cfg = new
    data = task.load_data(cfg)
    check_budget(cfg, task.build_model(cfg), data.train.images[:1])
    run.write_config(cfg)
    return Context(cfg, run, progress), data


# --------------------------------------------------------------------------------------------- stages
def stage_fp32(ctx: Context, data: task.ClassificationData) -> nn.Module:
    t0 = time.perf_counter()
    model, record = task.full_precision_model(ctx.cfg, data, progress=ctx.progress)
    save_torch(ctx.run.path("fp32.pt"), {"state_dict": model.state_dict(), "model": ctx.cfg.model, **record})
    top1 = evaluate(model, data.test, progress=ctx.progress)
    ctx.log(f"full precision: top-1 {top1:.2f}% ({record['source']})")
    ctx.run.update_results(stage="fp32", wall_s=time.perf_counter() - t0,
                           models={"fp32": {"top1": top1, "source": record["source"]}})
    return model


def load_fp32(ctx: Context) -> nn.Module:
    model = task.build_model(ctx.cfg)
    path = ctx.run.path("fp32.pt")
    if not path.exists():
        raise ValueError(f"{path} is missing: run `hawq run --out {ctx.run.root}` (or the fp32 stage) first")
    task.load_state_into(model, path)
    return model.to(ctx.cfg.device).eval()


def trace_batches(cfg: RunConfig, data: task.ClassificationData):
    return batches(data.train, cfg.trace_batch_size, shuffle=True, seed=cfg.seed + 1)


def trace_settings(cfg: RunConfig) -> dict:
    """What, besides the weights, decides the traces: a traces.json with the same values is reused."""
    return {"method": cfg.trace_method, "rel_tol": cfg.trace_rel_tol, "max_images": trace_max_images(cfg),
            "batch_size": cfg.trace_batch_size, "seed": cfg.seed, "dataset": cfg.dataset,
            "n_train": None if cfg.train_images is None else cfg.train_images, "diagonal": cfg.sensitivity == "diag"}


def trace_max_images(cfg: RunConfig) -> int:
    return min(cfg.trace_max_images, 256) if cfg.quick else cfg.trace_max_images


def stage_trace(ctx: Context, data: task.ClassificationData, model: nn.Module | None = None) -> dict:
    t0 = time.perf_counter()
    model = model if model is not None else load_fp32(ctx)
    cfg = ctx.cfg
    settings, w_hash = trace_settings(cfg), weights_hash(model)
    path = ctx.run.path("traces.json")
    if path.exists():
        old = read_json(path, "traces")
        diag_ok = not settings["diagonal"] or ctx.run.path("diagonals.pt").exists()
        if old.get("weights_hash") == w_hash and old.get("settings") == settings and diag_ok:
            ctx.log("traces: reusing traces.json (same weights, data and settings)")
            return old
    partial = ctx.run.path("traces.partial.pt")  # running sums: an interrupted estimation resumes here
    result = estimate_traces(model, trace_batches(cfg, data), method=cfg.trace_method, rel_tol=cfg.trace_rel_tol,
                             max_images=trace_max_images(cfg), seed=cfg.seed, progress=ctx.progress,
                             diagonal=settings["diagonal"], state_path=partial)
    payload = result.to_dict()
    wall_s = payload.pop("wall_s", time.perf_counter() - t0)
    payload.update(weights_hash=w_hash, settings=settings)
    if getattr(result, "diagonals", None):
        save_torch(ctx.run.path("diagonals.pt"), result.diagonals)
    write_json(path, "traces", payload)
    partial.unlink(missing_ok=True)
    worst = max(lt.stderr / abs(lt.trace) if lt.trace else 0.0 for lt in result.layers)
    ctx.log(f"traces: {len(result.layers)} layers by {result.method} on {result.n_images} images "
            f"(largest relative standard error {100 * worst:.1f}%)")
    ctx.run.update_results(stage="trace", wall_s=time.perf_counter() - t0,
                           traces={"method": result.method, "n_images": result.n_images, "wall_s": wall_s,
                                   "n_backward": result.n_backward})
    return payload


def stage_allocate(ctx: Context, data: task.ClassificationData, model: nn.Module | None = None) -> Plan:
    t0 = time.perf_counter()
    cfg = ctx.cfg
    model = model if model is not None else load_fp32(ctx)
    traces = read_json(ctx.run.path("traces.json"), "traces")
    means = {row["fqn"]: row["trace"] for row in traces["layers"]}
    diagonals = None
    if cfg.sensitivity == "diag":
        from hawq.io import load_torch

        diagonals = load_torch(ctx.run.path("diagonals.pt"))
    table = sensitivity_table(model, means, bits=cfg.w_bits, fixed=_fixed(cfg, model), diagonals=diagonals,
                              example_input=data.train.images[:1].to(cfg.device))
    table_dict = table.to_dict()
    table_dict["measure"] = table_dict.pop("kind", "trace")
    write_json(ctx.run.path("sensitivity.json"), "sensitivity", table_dict)
    frontier = pareto_frontier(table)
    budget = budget_bytes(cfg, table)
    plan = best_plan(table, budget, a_bits=cfg.a_bits)
    points = [{"plan_id": i, **p.to_dict()} for i, p in enumerate(frontier)]
    write_json(ctx.run.path("frontier.json"), "frontier", {"fqns": list(table.fqns), "points": points})
    uniform = {f"uniform{b}": plan_for_bits(table, b, a_bits=cfg.a_bits) for b in sorted(set(cfg.baselines))}
    write_json(ctx.run.path("plan.json"), "plan", {
        **plan.to_dict(), "budget_bytes": budget, "budget_mb": budget / MB,
        "size": size_report(table, plan), "sensitivity": table.kind,
        "uniform": {k: p.to_dict() for k, p in uniform.items()},
    })
    ctx.log(f"plan: {plan.size_bytes / MB:.4f} MB (budget {budget / MB:.4f} MB), total Omega {plan.omega:.4g}, "
            f"{len(frontier)} Pareto points")
    ctx.run.update_results(stage="allocate", wall_s=time.perf_counter() - t0,
                           allocation={"budget_mb": budget / MB, "frontier_points": len(frontier)})
    return plan


def plans_to_compare(ctx: Context) -> dict[str, Plan]:
    d = read_json(ctx.run.path("plan.json"), "plan")
    plans = {"hawq": Plan.from_dict(d)}
    plans.update({k: Plan.from_dict(v) for k, v in d.get("uniform", {}).items()})
    return plans


def quantized_copy(fp32: nn.Module, plan: Plan, data: task.ClassificationData) -> nn.Module:
    model = task.clone(fp32)
    quantize_(model, plan)
    if any(b is not None for b in plan.a_bits.values()):
        calibrate_(model, batches(data.train, 256), n_batches=8)
    return model


def stage_finetune(ctx: Context, data: task.ClassificationData, model: nn.Module | None = None) -> dict:
    t0 = time.perf_counter()
    cfg = ctx.cfg
    fp32 = model if model is not None else load_fp32(ctx)
    ft_images = min(cfg.ft_images, 512) if cfg.quick else cfg.ft_images
    tcfg = TrainConfig(n_images=max(ft_images, 1), batch_size=cfg.ft_batch_size, lr=cfg.ft_lr, weight_decay=1e-4,
                       seed=cfg.seed, distill_temperature=4.0 if cfg.distill else None)
    out = {}
    for name, plan in plans_to_compare(ctx).items():
        ckpt = ctx.run.path(f"qat/{name}.pt")
        qmodel = quantized_copy(fp32, plan, data)
        before = evaluate(qmodel, data.test, progress=ctx.progress)
        if ft_images > 0:
            train(qmodel, data.train, tcfg, teacher=fp32 if cfg.distill else None, progress=ctx.progress,
                  desc=f"finetune {name}")
        after = evaluate(qmodel, data.test, progress=ctx.progress) if ft_images > 0 else before
        save_torch(ckpt, {"state_dict": qmodel.state_dict(), "plan": plan.to_dict(), "finetune": tcfg.to_dict()})
        out[name] = {"top1_before_ft": before, "top1": after, "size_bytes": plan.size_bytes,
                     "size_mb": plan.size_bytes / MB, "omega": plan.omega, "bops": plan.bops,
                     "ft_images": ft_images}
        ctx.log(f"{name}: top-1 {before:.2f}% before fine-tuning, {after:.2f}% after ({plan.size_bytes / MB:.4f} MB)")
    ctx.run.update_results(stage="finetune", wall_s=time.perf_counter() - t0, models=out)
    return out


def stage_evaluate(ctx: Context, data: task.ClassificationData) -> dict:
    """Evaluate the fine-tuned checkpoints in qat/ again (e.g. on another --data-dir)."""
    t0 = time.perf_counter()
    cfg = ctx.cfg
    fp32 = load_fp32(ctx)
    out = {"fp32": {"top1": evaluate(fp32, data.test, progress=ctx.progress)}}
    for name, plan in plans_to_compare(ctx).items():
        ckpt = ctx.run.path(f"qat/{name}.pt")
        if not ckpt.exists():
            raise ValueError(f"{ckpt} is missing: run `hawq finetune --out {ctx.run.root}` first")
        qmodel = task.clone(fp32).cpu()
        quantize_(qmodel, plan)
        task.load_state_into(qmodel, ckpt)
        qmodel.to(cfg.device)
        out[name] = {"top1": evaluate(qmodel, data.test, progress=ctx.progress)}
        ctx.log(f"{name}: top-1 {out[name]['top1']:.2f}%")
    ctx.run.update_results(stage="evaluate", wall_s=time.perf_counter() - t0, models=out)
    return out


def stage_report(ctx: Context) -> Path:
    from hawq.report import write_report

    t0 = time.perf_counter()
    path = write_report(ctx.run.root)
    ctx.run.update_results(stage="report", wall_s=time.perf_counter() - t0)
    ctx.log(f"report: {path}")
    return path


def run_all(cfg: RunConfig, out: str | Path, progress: bool = True) -> dict:
    """Every stage, in order, into `out`. Returns results.json's content."""
    t0 = time.perf_counter()
    ctx, data = prepare(cfg, out, progress)
    model = stage_fp32(ctx, data)
    stage_trace(ctx, data, model)
    stage_allocate(ctx, data, model)
    stage_finetune(ctx, data, model)
    ctx.run.update_results(total_wall_s=round(time.perf_counter() - t0, 2))
    stage_report(ctx)
    return ctx.run.results()
