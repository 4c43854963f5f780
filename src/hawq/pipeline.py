"""The stages of a run wired together over a run folder (docs/design.md: data flow and artifacts).

    prepare -> fp32 -> trace -> allocate -> finetune -> report
Each stage reads the artifacts of the stages before it from the folder, so it can be rerun alone.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from hawq.alloc import (
    MB,
    Plan,
    SensitivityTable,
    activation_omega,
    activation_perturbations,
    best_joint_plan,
    best_plan,
    default_fixed,
    fp32_size_bytes,
    joint_frontier,
    layer_macs,
    make_plan,
    min_size_bytes,
    pareto_frontier,
    plan_for_bits,
    sensitivity_table,
    size_report,
    sizing_table,
    smallest_bops,
)
from hawq.alloc.plan import bops_shortfall
from hawq.artifacts import load_torch, read_json, save_torch, write_json
from hawq.config import RunConfig, check_device
from hawq.distributed import barrier, distributed_traces, world_size
from hawq.hessian import estimate_activation_traces, estimate_traces, weights_hash
from hawq.quant import calibrate_, quantize_
from hawq.quant.ranges import set_weight_range_
from hawq.runfolder import RunFolder
from hawq.tasks import Task, get_task
from hawq.train.ptq import PostTrainConfig, post_train_


@dataclass
class Context:
    cfg: RunConfig
    run: RunFolder
    progress: bool = True

    @property
    def task(self) -> Task:
        return get_task(self.cfg)  # one object per (task, dataset)

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


def size_budget_applies(cfg: RunConfig) -> bool:
    """A BOPs budget alone replaces the default size budget (--budget-bits); --budget-mb or --compression stay."""
    return cfg.budget_mb is not None or cfg.compression is not None or cfg.budget_gbops is None


def uniform_size_bytes(table: SensitivityTable, bits: float) -> float:
    """Size with every free layer at `bits` (may be fractional, e.g. 2.5) and fixed layers at their bits."""
    total = 32 * table.other_params
    for row in table.layers:
        total += row.n_params * (row.bits[0] if row.fixed else bits)
    return total / 8


def _fixed(cfg: RunConfig, model: nn.Module, example: Any = None) -> dict[str, int]:
    """The layers kept at 8 bits: the task's, else the first and last found from one forward of `example`
    (the first reading the input, the last feeding the output; module order without an example)."""
    if not cfg.keep_first_last:
        return {}
    fixed = get_task(cfg).fixed_layers(model)
    if fixed:
        return fixed
    if isinstance(example, Tensor):
        return default_fixed(model, example.to(next(model.parameters()).device))
    return default_fixed(model)


def check_feasible(cfg: RunConfig, model: nn.Module, example: Any = None) -> None:
    """Fail before anything is written when no plan can meet the size or the BOPs budget.

    The BOPs check needs the layers' MACs: one forward of `example` (an input batch)."""
    table = sizing_table(model, bits=cfg.w_bits, fixed=_fixed(cfg, model, example))
    budget = budget_bytes(cfg, table)
    smallest = min_size_bytes(table)
    if size_budget_applies(cfg) and budget < smallest:
        raise ValueError(
            f"budget {budget / MB:.4f} MB is below the smallest feasible size {smallest / MB:.4f} MB "
            f"(every layer at its lowest bit width): raise --budget-mb"
        )
    if cfg.budget_gbops is not None and example is not None:
        macs = layer_macs(model, example.to(next(model.parameters()).device))
        table = dataclasses.replace(table, layers=tuple(dataclasses.replace(r, macs=macs.get(r.fqn, 0))
                                                        for r in table.layers))
        least = smallest_bops(table, cfg.a_bits_options or (cfg.a_bits,), joint=bool(cfg.a_bits_options))
        if cfg.budget_gbops * 1e9 < least:
            raise bops_shortfall(cfg.budget_gbops * 1e9, least)


def prepare(cfg: RunConfig, out: str | Path, progress: bool = True) -> tuple[Context, Any]:
    """Validate everything that can be validated, then write config.json."""
    check_device(cfg.device)
    run = RunFolder(out)
    run.check_config(cfg)
    task = get_task(cfg)
    data = task.load_data(cfg)
    model = task.build_model(cfg)
    check_feasible(cfg, model, task.example_input(data))
    if cfg.checkpoint is not None:
        task.load_state_into(model, cfg.checkpoint)
    run.write_config(cfg)
    return Context(cfg, run, progress), data


def open_run(out: str | Path, progress: bool = True, needs_device: bool = True, stage: str | None = None,
             **overrides) -> tuple[Context, Any]:
    """The run in `out` with `overrides` applied; `needs_device=False` for stages that only read artifacts.
    `stage`: the stage about to run, refused in one line (before anything is written) if the task cannot."""
    run = RunFolder(out)
    cfg = run.read_config()
    if overrides:
        new = cfg.replace(**overrides)
        if new.fingerprint() != cfg.fingerprint():
            raise ValueError("these options change the run's identity: start a new run with `hawq run --out NEW`")
        cfg = new
    if needs_device:
        check_device(cfg.device)
    task = get_task(cfg)
    if stage is not None:
        task.refuse(stage)
    data = task.load_data(cfg)
    check_feasible(cfg, task.build_model(cfg), task.example_input(data))
    run.write_config(cfg)
    return Context(cfg, run, progress), data


# --------------------------------------------------------------------------------------------- stages
def _fmt(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in scores.items())


def stage_fp32(ctx: Context, data: Any) -> nn.Module:
    t0 = time.perf_counter()
    task = ctx.task
    model, record = task.full_precision_model(ctx.cfg, data, progress=ctx.progress)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    save_torch(ctx.run.fp32, {"state_dict": state, "model": ctx.cfg.model, **record})
    scores = task.evaluate(model, data, progress=ctx.progress)
    ctx.log(f"full precision: {_fmt(scores)} ({record['source']})")
    if ctx.cfg.quick and record["source"] == "trained":
        ctx.log("this smoke run's model had one epoch on its few images, so its comparison means little: "
                "`hawq train` with the same options but without --quick makes the full model, which --quick then uses")
    ctx.run.update_results(stage="fp32", wall_s=time.perf_counter() - t0, metric=task.metric,
                           models={"fp32": {**scores, "source": record["source"]}})
    return model


def load_fp32(ctx: Context) -> nn.Module:
    model = ctx.task.build_model(ctx.cfg)
    path = ctx.run.fp32
    if not path.exists():
        raise ValueError(f"{path} is missing: run `hawq run --out {ctx.run.root}` (or the fp32 stage) first")
    ctx.task.load_state_into(model, path)
    return model.to(ctx.cfg.device).eval()


def trace_settings(cfg: RunConfig) -> dict:
    """What, besides the weights, decides the traces: a traces.json with the same values is reused."""
    return {"method": cfg.trace_method, "rel_tol": cfg.trace_rel_tol, "max_images": trace_max_images(cfg),
            "batch_size": cfg.trace_batch_size, "chunk": cfg.trace_chunk, "seed": cfg.seed, "dataset": cfg.dataset,
            "n_train": cfg.train_images, "diagonal": cfg.sensitivity == "diag",
            "activations": bool(cfg.a_bits_options)}


def trace_max_images(cfg: RunConfig) -> int:
    return min(cfg.trace_max_images, 256) if cfg.quick else cfg.trace_max_images


def stage_trace(ctx: Context, data: Any, model: nn.Module | None = None) -> dict:
    t0 = time.perf_counter()
    model = model if model is not None else load_fp32(ctx)
    cfg = ctx.cfg
    settings, w_hash = trace_settings(cfg), weights_hash(model)
    path = ctx.run.traces
    if path.exists():
        old = read_json(path, "traces")
        diag_ok = not settings["diagonal"] or ctx.run.diagonals.exists()
        if old.get("weights_hash") == w_hash and old.get("settings") == settings and diag_ok:
            ctx.log("traces: reusing traces.json (same weights, data and settings)")
            return old
    partial = ctx.run.traces_partial  # running sums: an interrupted estimation resumes here
    kwargs = dict(method=cfg.trace_method, loss=ctx.task.trace_loss(model), rel_tol=cfg.trace_rel_tol,
                  max_images=trace_max_images(cfg), seed=cfg.seed, progress=ctx.progress,
                  diagonal=settings["diagonal"], chunk_size=cfg.trace_chunk)
    if world_size() > 1:  # each rank estimates on its share of the batches; pooled on every rank
        result = distributed_traces(model, ctx.task.trace_batches(cfg, data), **kwargs)
    else:
        result = estimate_traces(model, ctx.task.trace_batches(cfg, data), state_path=partial, **kwargs)
    bad = [lt.fqn for lt in result.layers if not math.isfinite(lt.trace)]
    if bad:
        raise ValueError(f"the traces of {len(bad)} layers ({', '.join(bad[:3])}...) are not finite: the model's "
                         "outputs overflow; check the full-precision weights (train longer or pass --checkpoint)")
    payload = result.to_dict()
    wall_s = payload.pop("wall_s", time.perf_counter() - t0)
    payload.update(weights_hash=w_hash, settings=settings)
    if settings["activations"]:
        payload["activations"] = _activation_traces(ctx, data, model)
    if getattr(result, "diagonals", None):
        save_torch(ctx.run.diagonals, result.diagonals)
    write_json(path, "traces", payload)
    if world_size() == 1:
        partial.unlink(missing_ok=True)
        ctx.run.act_traces_partial.unlink(missing_ok=True)
    _log_traces(ctx, result)
    ctx.run.update_results(stage="trace", wall_s=time.perf_counter() - t0,
                           traces={"method": result.method, "n_images": result.n_images, "wall_s": wall_s,
                                   "n_backward": result.n_backward})
    return payload


def _activation_traces(ctx: Context, data: Any, model: nn.Module) -> dict:
    """Per-input activation traces (--a-bits-options), resumable like the weight traces."""
    cfg = ctx.cfg
    act = estimate_activation_traces(model, ctx.task.trace_batches(cfg, data), method=cfg.trace_method,
                                     loss=ctx.task.trace_loss(model), rel_tol=cfg.trace_rel_tol,
                                     max_images=trace_max_images(cfg), seed=cfg.seed, progress=ctx.progress,
                                     chunk_size=cfg.trace_chunk,
                                     state_path=ctx.run.act_traces_partial if world_size() == 1 else None)
    ctx.log(f"activation traces: {len(act.layers)} layer inputs by {act.method} on {act.n_images} images")
    return {k: v for k, v in act.to_dict().items() if k != "wall_s"}


def _log_traces(ctx: Context, result) -> None:
    worst = max(lt.stderr / abs(lt.trace) if lt.trace else float("inf") for lt in result.layers)
    ctx.log(f"traces: {len(result.layers)} layers by {result.method} on {result.n_images} images "
            f"(largest relative standard error {100 * worst:.1f}%)")
    for note in result.notes:
        ctx.log(f"traces: {note}")
    if not result.converged:
        idle = sum(not lt.converged for lt in result.layers)
        ctx.log(f"traces: {idle} layers stopped above --trace-rel-tol {ctx.cfg.trace_rel_tol} at "
                f"{result.n_images} images: raise --trace-max-images for sharper traces")


def _trace_means(ctx: Context, traces: dict) -> dict[str, float]:
    """Average traces per layer of traces.json's content; negative ones (a non-convex loss away from a minimum)
    count as 0 in Omega = Tr/n * ||dW||^2, with a warning."""
    means = {row["fqn"]: row["trace"] for row in traces["layers"]}
    negative = sorted(k for k, v in means.items() if v < 0)
    if negative:
        ctx.log(f"warning: negative average trace for {', '.join(negative)}; counted as 0 in Omega")
    return {k: max(v, 0.0) for k, v in means.items()} if negative else means


def _diagonals(ctx: Context) -> dict | None:
    """The curvature diagonals of `--sensitivity diag` (diagonals.pt), else None."""
    if ctx.cfg.sensitivity != "diag":
        return None
    if not ctx.run.diagonals.exists():
        raise ValueError(f"the diagonal sensitivity needs curvature diagonals: run `hawq run --sensitivity diag "
                         f"--out {ctx.run.root}`")
    return load_torch(ctx.run.diagonals)


def _gbops(cfg: RunConfig) -> float | None:
    return None if cfg.budget_gbops is None else cfg.budget_gbops * 1e9


def _weight_only_plan(cfg: RunConfig, table: SensitivityTable, budget: float) -> Plan:
    return best_plan(table, budget if size_budget_applies(cfg) else None, a_bits=cfg.a_bits, budget_bops=_gbops(cfg))


def _joint_plan(ctx: Context, data: Any, model: nn.Module, traces: dict, table: SensitivityTable, budget: float,
                table_dict: dict, frontier_doc: dict) -> tuple[Plan, dict]:
    """Weight and activation bits together (--a-bits-options); adds the activation Omega to `table_dict` and
    the BOPs frontier to `frontier_doc`. Returns the plan and the activation Omega."""
    cfg = ctx.cfg
    act_traces = {r["fqn"]: r["trace"] for r in traces["activations"]["layers"]}
    pert = activation_perturbations(model, ctx.task.calibration_batches(data), list(table.fqns), cfg.a_bits_options)
    act_omega = activation_omega(act_traces, pert)
    table_dict["activation_omega"] = {k: {str(b): v for b, v in d.items()} for k, d in act_omega.items()}
    plan = best_joint_plan(table, act_omega, a_bits=cfg.a_bits_options,
                           budget_bytes=budget if size_budget_applies(cfg) else None, budget_bops=_gbops(cfg))
    joint = joint_frontier(table, act_omega, a_bits=cfg.a_bits_options, cost="bops")
    frontier_doc["bops_points"] = [{"plan_id": i, **p.to_dict()} for i, p in enumerate(joint)]
    return plan, act_omega


def stage_allocate(ctx: Context, data: Any, model: nn.Module | None = None) -> Plan:
    """Sensitivity table, Pareto frontier, the best plan under the budget and the uniform plans to compare."""
    t0 = time.perf_counter()
    cfg = ctx.cfg
    model = model if model is not None else load_fp32(ctx)
    example = ctx.task.example_input(data)
    traces = read_json(ctx.run.traces, "traces")
    table = sensitivity_table(model, _trace_means(ctx, traces), bits=cfg.w_bits, fixed=_fixed(cfg, model, example),
                              diagonals=_diagonals(ctx), example_input=example.to(cfg.device),
                              weight_range=cfg.weight_range)
    table_dict = table.to_dict()
    table_dict["measure"] = table_dict.pop("kind", "trace")
    frontier = pareto_frontier(table)
    budget = budget_bytes(cfg, table)
    frontier_doc = {"fqns": list(table.fqns), "points": [{"plan_id": i, **p.to_dict()} for i, p in enumerate(frontier)]}
    if cfg.a_bits_options:
        plan, act_omega = _joint_plan(ctx, data, model, traces, table, budget, table_dict, frontier_doc)
        uniform_a = max(cfg.a_bits_options)
    else:
        plan, act_omega, uniform_a = _weight_only_plan(cfg, table, budget), None, cfg.a_bits
    write_json(ctx.run.sensitivity, "sensitivity", table_dict)
    if not size_budget_applies(cfg):
        budget = None  # recorded as no size budget, not as one the plan may exceed
    write_json(ctx.run.frontier, "frontier", frontier_doc)
    uniform = {f"uniform{b}": make_plan(table, plan_for_bits(table, b).w_bits, {f: uniform_a for f in table.fqns},
                                        act_omega) for b in sorted(set(cfg.baselines))}
    write_json(ctx.run.plan, "plan", {
        **plan.to_dict(), "budget_bytes": budget, "budget_mb": None if budget is None else budget / MB,
        "budget_gbops": cfg.budget_gbops,
        "size": size_report(table, plan), "sensitivity": table.kind,
        "uniform": {k: p.to_dict() for k, p in uniform.items()},
    })
    within = [] if budget is None else [f"{budget / MB:.4f} MB"]
    within += [] if cfg.budget_gbops is None else [f"{plan.bops / 1e9:.4g} of {cfg.budget_gbops:.4g} GBOPs"]
    ctx.log(f"plan: {plan.size_bytes / MB:.4f} MB (budget {', '.join(within)}), total Omega {plan.omega:.4g}, "
            f"{len(frontier)} Pareto points")
    ctx.run.update_results(stage="allocate", wall_s=time.perf_counter() - t0,
                           allocation={"budget_mb": None if budget is None else budget / MB,
                                       "frontier_points": len(frontier),
                                       "budget_gbops": cfg.budget_gbops, "joint": bool(cfg.a_bits_options)})
    return plan


def plans_to_compare(ctx: Context) -> dict[str, Plan]:
    d = read_json(ctx.run.plan, "plan")
    plans = {"hawq": Plan.from_dict(d)}
    plans.update({k: Plan.from_dict(v) for k, v in d.get("uniform", {}).items()})
    return plans


def post_train_config(cfg: RunConfig) -> PostTrainConfig:
    return PostTrainConfig(weight_range=cfg.weight_range, bn_images=cfg.bn_images, act_range=cfg.act_range)


def quantized_copy(task: Any, fp32: nn.Module, plan: Plan, data: Any, cfg: RunConfig | None = None) -> nn.Module:
    """The plan applied to a copy of `fp32`, then the post-training steps of `cfg` (weight clipping,
    activation ranges, batch-norm re-estimation; hawq.train.ptq). Without `cfg`: min/max calibration only."""
    model = copy.deepcopy(fp32)
    quantize_(model, plan)
    if cfg is not None:
        post_train_(model, lambda: task.calibration_batches(data), post_train_config(cfg))
    elif any(b is not None for b in plan.a_bits.values()):
        calibrate_(model, task.calibration_batches(data), n_batches=8)
    return model


def stage_finetune(ctx: Context, data: Any, model: nn.Module | None = None) -> dict:
    t0 = time.perf_counter()
    cfg, task = ctx.cfg, ctx.task
    fp32 = model if model is not None else load_fp32(ctx)
    ft_images = min(cfg.ft_images, 512) if cfg.quick else cfg.ft_images
    reference = fp32_score(ctx, fp32, data) if ft_images > 0 and cfg.ft_skip_within >= 0 else None
    out = {}
    for name, plan in plans_to_compare(ctx).items():
        qmodel = quantized_copy(task, fp32, plan, data, cfg)  # fine-tuning starts from the post-trained model
        before = task.evaluate(qmodel, data, progress=ctx.progress)
        ft, skipped = {}, None
        lost = None if reference is None else (reference - before[task.metric]) * (1 if task.higher_is_better else -1)
        if lost is not None and lost <= cfg.ft_skip_within:
            skipped = (f"within {cfg.ft_skip_within:g} points of full precision ({reference:.2f}) before "
                       "fine-tuning (--ft-skip-within)")
        if ft_images > 0 and skipped is None:
            ft = task.finetune(qmodel, data, cfg, ft_images, teacher=fp32 if cfg.distill else None,
                               progress=ctx.progress, desc=f"finetune {name}")
        tuned = bool(ft)
        after = task.evaluate(qmodel, data, progress=ctx.progress) if tuned else before
        state = {k: v.cpu() for k, v in qmodel.state_dict().items()}
        save_torch(ctx.run.qat(name), {"state_dict": state, "plan": plan.to_dict(), "finetune": ft})
        out[name] = {**after, **{f"{k}_before_ft": v for k, v in before.items()}, "size_bytes": plan.size_bytes,
                     "size_mb": plan.size_bytes / MB, "omega": plan.omega, "bops": plan.bops,
                     "ft_images": ft_images if tuned else 0, **({"ft_skipped": skipped} if skipped else {})}
        tail = f"{_fmt(after)} after" if tuned else f"not fine-tuned: {skipped}" if skipped else "no fine-tuning"
        ctx.log(f"{name}: {_fmt(before)} before fine-tuning, {tail} ({plan.size_bytes / MB:.4f} MB)")
    ctx.run.update_results(stage="finetune", wall_s=time.perf_counter() - t0, metric=task.metric, models=out)
    return out


def fp32_score(ctx: Context, fp32: nn.Module, data: Any) -> float:
    """The full-precision model's score on the task's metric: from results.json, else evaluated now."""
    recorded = ctx.run.read_results().get("models", {}).get("fp32", {}).get(ctx.task.metric)
    if recorded is not None:
        return float(recorded)
    return float(ctx.task.evaluate(fp32, data, progress=ctx.progress)[ctx.task.metric])


def load_finetuned(ctx: Context, fp32: nn.Module, name: str, plan: Plan) -> nn.Module:
    ckpt = ctx.run.qat(name)
    if not ckpt.exists():
        raise ValueError(f"{ckpt} is missing: run `hawq finetune --out {ctx.run.root}` first")
    qmodel = copy.deepcopy(fp32).cpu()
    quantize_(qmodel, plan)
    set_weight_range_(qmodel, ctx.cfg.weight_range)
    ctx.task.load_state_into(qmodel, ckpt)
    return qmodel.to(ctx.cfg.device).eval()


def stage_evaluate(ctx: Context, data: Any) -> dict:
    """Evaluate the fine-tuned checkpoints in qat/ again (e.g. on another --data-dir)."""
    t0 = time.perf_counter()
    task = ctx.task
    fp32 = load_fp32(ctx)
    out = {"fp32": task.evaluate(fp32, data, progress=ctx.progress)}
    for name, plan in plans_to_compare(ctx).items():
        out[name] = task.evaluate(load_finetuned(ctx, fp32, name, plan), data, progress=ctx.progress)
        ctx.log(f"{name}: {_fmt(out[name])}")
    ctx.run.update_results(stage="evaluate", wall_s=time.perf_counter() - t0, models=out)
    return out


def stage_export(ctx: Context, data: Any) -> dict:
    """The fine-tuned HAWQ plan as QDQ ONNX (INT8/INT4/INT2 or bit-packed weights), checked in onnxruntime."""
    from hawq.export import export_onnx, size_breakdown, verify_onnx

    t0 = time.perf_counter()
    ctx.task.refuse("export")
    fp32 = load_fp32(ctx)
    plan = plans_to_compare(ctx)["hawq"]
    qmodel = load_finetuned(ctx, fp32, "hawq", plan).cpu().eval()
    example = ctx.task.example_input(data).cpu()
    report = export_onnx(qmodel, ctx.run.onnx, example)
    verified = verify_onnx(report.path, qmodel, ctx.task.export_batches(data), progress=ctx.progress)
    sizes = size_breakdown(report.path)
    scores = ctx.task.export_scores(verified) if verified.torch_cross_entropy is not None else {}
    out = {**report.to_dict(), "verify": verified.to_dict(), "size": sizes, "computed_size_bytes": plan.size_bytes}
    if scores:
        out["scores"] = {"metric": ctx.task.metric, **scores}
    ctx.run.update_results(stage="export", wall_s=time.perf_counter() - t0, export=out)
    top1 = "" if verified.onnx_top1 is None else f", onnxruntime top-1 {100 * verified.onnx_top1:.2f}%"
    metric = "" if not scores else (f", {ctx.task.metric} PyTorch {scores['torch']:.4f} onnxruntime "
                                    f"{scores['onnx']:.4f}")
    ctx.log(f"export: {report.path} ({sizes['file_size_bytes']} bytes, allocator {plan.size_bytes:.0f} bytes); "
            f"top-1 agreement {100 * verified.top1_agreement:.2f}% of {verified.n_predictions} predictions"
            f"{top1}{metric}")
    return out


def stage_report(ctx: Context) -> Path:
    from hawq.report import write_report

    t0 = time.perf_counter()
    path = write_report(ctx.run.root)
    ctx.run.update_results(stage="report", wall_s=time.perf_counter() - t0)
    ctx.log(f"report: {path}")
    return path


def _secs(s: float) -> str:
    return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"


QUICK_NOTE = ("smoke run (--quick): few images everywhere, so its numbers are not the benchmark's; "
              "run without --quick for those")


def summary_lines(results: dict, quick: bool) -> list[str]:
    """The end of a run on the terminal: the wall time of every stage and the total, and what --quick means."""
    order = ("fp32", "trace", "allocate", "finetune", "evaluate", "export", "report")
    done = results.get("stages", {})
    ranked = sorted(done, key=lambda k: order.index(k) if k in order else len(order))
    stages = ", ".join(f"{k} {_secs(done[k]['wall_s'])}" for k in ranked if "wall_s" in done[k])
    lines = [f"wall time: {stages}; total {_secs(results.get('total_wall_s', 0))}"]
    return lines + ([QUICK_NOTE] if quick else [])


def run_all(cfg: RunConfig, out: str | Path, progress: bool = True, paper: dict | None = None) -> dict:
    """Every stage, in order, into `out`. Returns results.json's content. `paper`: a recipe's published
    numbers, compared in results.json with what this run measured."""
    t0 = time.perf_counter()
    ctx, data = prepare(cfg, out, progress)
    barrier()
    model = stage_fp32(ctx, data)
    barrier()
    stage_trace(ctx, data, model)
    barrier()
    stage_allocate(ctx, data, model)
    barrier()
    stage_finetune(ctx, data, model)
    barrier()
    ctx.run.update_results(total_wall_s=round(time.perf_counter() - t0, 2))
    if paper:
        ours = ctx.run.read_results()["models"].get("hawq", {}).get(paper.get("metric", ctx.task.metric))
        theirs = (paper.get("hawq_v2") or {}).get("value")
        delta = None if ours is None or theirs is None else round(ours - theirs, 3)
        ctx.run.update_results(paper=paper, delta_vs_paper=delta)
    stage_report(ctx)
    ctx.run.update_results(total_wall_s=round(time.perf_counter() - t0, 2))  # the report included
    return ctx.run.read_results()
