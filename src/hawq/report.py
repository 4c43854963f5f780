"""report.md and figures/*.png from a run folder's artifacts (reads JSON only; no model is loaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hawq.artifacts import _atomic_write_bytes, read_json
from hawq.runfolder import RunFolder

MB = 2**20


def _load(p: Path, kind: str) -> dict[str, Any] | None:
    return read_json(p, kind) if p.exists() else None


def _fig_traces(traces: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = traces["layers"]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows)), 3.6))
    x = range(len(rows))
    err = [float("nan") if r["stderr"] is None else r["stderr"] for r in rows]  # None: one sample only
    ax.bar(x, [max(r["trace"], 0.0) for r in rows], yerr=err, capsize=2, color="#4c72b0")
    ax.set_yscale("log")
    ax.set_xticks(list(x), [r["fqn"] for r in rows], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("average Hessian trace Tr(H)/n")
    ax.set_title(f"Per-layer average trace ({traces.get('method')}, {traces.get('n_images')} images, ±1 s.e.)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fig_convergence(traces: dict, path: Path) -> bool:
    import matplotlib.pyplot as plt

    hist = traces.get("history") or {}
    if not hist:
        return False
    rows = sorted(traces["layers"], key=lambda r: -r["trace"])[:8]
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        h = [p for p in hist.get(r["fqn"], []) if p[1] != 0]
        if not h:
            continue
        n = [p[0] for p in h]
        mean = [p[1] / r["trace"] if r["trace"] else 0.0 for p in h]
        se = [(p[2] or 0.0) / r["trace"] if r["trace"] else 0.0 for p in h]
        (line,) = ax.plot(n, mean, label=r["fqn"], lw=1.2)
        ax.fill_between(n, [m - 2 * s for m, s in zip(mean, se)], [m + 2 * s for m, s in zip(mean, se)],
                        color=line.get_color(), alpha=0.15)
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xlabel("images processed")
    ax.set_ylabel("running estimate / final estimate")
    ax.set_title("Convergence of the largest layers' traces (band: ±2 s.e.)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fig_frontier(points: list[dict], plan: dict, path: Path, cost: str) -> None:
    """Total Omega against the cost ("size_bytes" in MB or "bops" in GBOPs): the frontier, the uniform plans
    and the chosen plan, with the budget as a vertical line."""
    import matplotlib.pyplot as plt

    scale, unit = (MB, "model size (MB)") if cost == "size_bytes" else (1e9, "GBOPs per image")
    if cost == "size_bytes":
        budget = plan.get("budget_bytes")
    else:
        budget = plan["budget_gbops"] * 1e9 if plan.get("budget_gbops") else None
    pts = [p for p in points if p["omega"] > 0 and p.get(cost)]  # log scale
    kind = "Pareto frontier" if cost == "size_bytes" else "joint weight+activation frontier"
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p[cost] / scale for p in pts], [p["omega"] for p in pts], ".-", ms=2.5, lw=0.8, color="#4c72b0",
            label=f"{kind} ({len(points)} plans)")
    for name, u in sorted(plan.get("uniform", {}).items()):
        if u.get(cost):
            ax.scatter(u[cost] / scale, u["omega"], marker="s", s=30, zorder=3, label=name)
    if plan.get(cost):
        ax.scatter(plan[cost] / scale, plan["omega"], marker="*", s=160, color="#c44e52", zorder=4, label="HAWQ plan")
    if budget:
        ax.axvline(budget / scale, color="gray", ls="--", lw=0.8, label="budget")
    if pts:
        ax.set_yscale("log")
    ax.set_xlabel(unit)
    ax.set_ylabel("total sensitivity Ω")
    ax.set_title(f"{unit.split(' (')[0].capitalize()} against total Ω")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fig_plan(plan: dict, traces: dict | None, path: Path) -> None:
    import matplotlib.pyplot as plt

    names = list(plan["layers"])
    if traces:  # model order (JSON keys are sorted)
        order = [r["fqn"] for r in traces["layers"] if r["fqn"] in plan["layers"]]
        names = order + [n for n in names if n not in order]
    bits = [plan["layers"][n]["w_bits"] for n in names]
    palette = {1: "#c44e52", 2: "#dd8452", 3: "#ccb974", 4: "#55a868", 8: "#4c72b0"}
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 3.4))
    ax.bar(range(len(names)), bits, color=[palette.get(b, "#8172b3") for b in bits])
    abits = [plan["layers"][n].get("a_bits") for n in names]
    if any(a is not None for a in abits):
        ax.plot(range(len(names)), [a or 0 for a in abits], "k_", ms=14, mew=2, label="activation bits")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("weight bits")
    ax.set_title(f"HAWQ plan: {plan['size_bytes'] / MB:.4f} MB")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


METRIC_LABELS = {"top1": "top-1 (%)", "map50": "mAP@0.5", "map": "mAP@[.5:.95]"}


def _results_table(results: dict, plan: dict | None) -> list[str]:
    models = results.get("models", {})
    if not models:
        return ["(no results yet)"]
    metric = results.get("metric", "top1")
    extra = [k for k in ("map",) if k != metric and any(k in m for m in models.values())]
    label = METRIC_LABELS.get(metric, metric)
    head = f"| model | size (MB) | Ω | {label} before fine-tuning | {label} after fine-tuning |"
    head += "".join(f" {METRIC_LABELS.get(k, k)} after |" for k in extra)
    lines = [head, "|---|---|---|---|---|" + "---|" * len(extra)]
    fp = models.get("fp32", {})
    if metric in fp:
        fp_size = plan["size"]["fp32_bytes"] / MB if plan and "size" in plan else float("nan")
        lines.append(f"| full precision | {fp_size:.4f} | 0 | {fp[metric]:.2f} | - |"
                     + "".join(f" {fp.get(k, float('nan')):.2f} |" for k in extra))
    order = sorted((k for k in models if k.startswith("uniform")), key=lambda k: -int(k[7:])) + ["hawq"]
    for name in order:
        m = models.get(name)
        if not m or f"{metric}_before_ft" not in m:
            continue
        title = "HAWQ-V2 plan" if name == "hawq" else f"uniform {name[7:]}-bit"
        after = f"{m[metric]:.2f}" + (" (not fine-tuned)" if m.get("ft_skipped") else "")
        lines.append(f"| {title} | {m['size_mb']:.4f} | {m['omega']:.4g} | {m[f'{metric}_before_ft']:.2f} | "
                     f"{after} |" + "".join(f" {m.get(k, float('nan')):.2f} |" for k in extra))
    skipped = {m["ft_skipped"] for m in models.values() if isinstance(m, dict) and m.get("ft_skipped")}
    if skipped:
        lines += ["", "Not fine-tuned: plans " + "; ".join(sorted(skipped)) + "."]
    return lines


def _positions(v: dict) -> str:
    n = v.get("n_predictions")
    return "" if n is None or n == v["n_samples"] else f" ({n:,} predictions: every position of every sequence)"


def _export_section(exp: dict, plan: dict | None) -> list[str]:
    v, sz = exp["verify"], exp["size"]
    float_bytes = sz.get("float_param_bytes", 0)
    computed = exp["computed_size_bytes"]
    lines = ["## Exported model (ONNX, QDQ)", "",
             f"`{Path(exp['path']).name}`, opset {exp['opset']}: {sz['file_size_bytes']:,} bytes on disk; the "
             f"allocator's size is {computed:,.0f} bytes (quantized weights at their bits, every other parameter "
             f"at 32 bits). Checked in onnxruntime against the PyTorch fake-quantized model on "
             f"{v['n_samples']} inputs{_positions(v)}: top-1 agreement {100 * v['top1_agreement']:.2f}%, max |logit "
             f"difference| {v['max_abs_diff']:.3g}, mean {v['mean_abs_diff']:.3g}."]
    if v.get("onnx_top1") is not None:
        lines[-1] += (f" Accuracy: onnxruntime {100 * v['onnx_top1']:.2f}%, PyTorch {100 * v['torch_top1']:.2f}%.")
    if exp.get("scores"):
        sc = exp["scores"]
        lines[-1] += f" {sc['metric']}: onnxruntime {sc['onnx']:.4f}, PyTorch {sc['torch']:.4f}."
    lines += ["", "| part of the file | bytes |", "|---|---|"]
    for key, label in (("int_weight_bytes", "packed integer weights"),
                       ("container_padding_bytes", "of which padding (whole bytes per layer, 1-bit in INT2)"),
                       ("packed_weight_bytes", "of which bit-packed 3/5/6/7-bit (decoded in the graph)"),
                       ("scale_bytes", "per-channel scales (float32)"), ("zero_point_bytes", "zero points"),
                       ("float_param_bytes", "float parameters (biases, folded batch norm)"),
                       ("protobuf_overhead_bytes", "graph structure and metadata")):
        if key in sz:
            lines.append(f"| {label} | {sz[key]:,} |")
    ratio = sz["file_size_bytes"] / computed if computed else float("nan")
    lines += ["", f"File / allocator size: {ratio:.2f}x (float parameters in the file: {float_bytes:,} bytes).", ""]
    return lines


def _budget_text(plan: dict) -> str:
    """The budgets the plan was chosen under: size (MB) and/or BOPs (GBOPs per image)."""
    parts = [] if plan.get("budget_mb") is None else [f"{plan['budget_mb']:.4f} MB"]
    parts += [] if plan.get("budget_gbops") is None else [f"{plan['budget_gbops']:.4g} GBOPs"]
    return " and ".join(parts) or "none"


def write_report(root: str | Path) -> Path:
    """Write root/report.md and root/figures/*.png from whatever artifacts exist."""
    run = RunFolder(root)
    cfg = _load(run.config_path, "config") or {}
    traces = _load(run.traces, "traces")
    plan = _load(run.plan, "plan")
    frontier = _load(run.frontier, "frontier")
    results = _load(run.results, "results") or {}
    figs = run.figures
    figs.mkdir(exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    md = [f"# hawq report: {cfg.get('model', '?')} on {cfg.get('dataset', '?')}", ""]
    quick = (" Smoke run (--quick): few images everywhere, so its numbers are not the benchmark's."
             if cfg.get("quick") else "")
    md += [f"Seed {cfg.get('seed')}, hawq {cfg.get('hawq_version')}, torch {cfg.get('torch_version')}, "
           f"device {cfg.get('device')} ({cfg.get('machine')}).{quick}", ""]
    md += ["## Results", ""] + _results_table(results, plan) + [""]
    if results.get("models", {}).get("hawq"):
        ft = results["models"]["hawq"].get("ft_images")
        md += [f"Every quantized model was fine-tuned identically ({ft} images, lr {cfg.get('ft_lr')}, cosine); "
               "full precision is the trained model, not fine-tuned further.", ""]
    if plan:
        s = plan.get("size", {})
        md += ["## Plan", "",
               f"Budget {_budget_text(plan)}; plan {plan['size_bytes'] / MB:.4f} MB"
               + ("" if plan.get("budget_gbops") is None or plan.get("bops") is None else
                  f", {plan['bops'] / 1e9:.4g} GBOPs")
               + f", total Ω {plan['omega']:.4g}"
               f" ({plan.get('sensitivity', 'trace')} sensitivity). Whole model: "
               f"{s.get('compression', float('nan')):.2f}x smaller than fp32; quantized layers: "
               f"{s.get('quantized_compression', float('nan')):.2f}x.", "",
               "![bits per layer](figures/plan.png)", ""]
        _fig_plan(plan, traces, figs / "plan.png")
        if frontier:
            _fig_frontier(frontier["points"], plan, figs / "frontier.png", "size_bytes")
            md += ["![Pareto frontier](figures/frontier.png)", ""]
            if frontier.get("bops_points"):
                _fig_frontier(frontier["bops_points"], plan, figs / "frontier_bops.png", "bops")
                md += ["![BOPs frontier](figures/frontier_bops.png)", ""]
    if traces:
        _fig_traces(traces, figs / "traces.png")
        md += ["## Hessian traces", "", f"Method `{traces['method']}` on {traces['n_images']} images"
               + (f" ({traces['reason']})." if traces.get("reason") else "."), ""]
        md += [f"> {n}" for n in traces.get("notes", [])] + ([""] if traces.get("notes") else [])
        idle = [r["fqn"] for r in traces["layers"] if not r.get("converged", True)]
        if idle:
            md += [f"**Not converged:** {len(idle)} layers stopped above the target relative standard error "
                   "(marked * below): more images would sharpen them.", ""]
        md += ["![traces](figures/traces.png)", ""]
        if _fig_convergence(traces, figs / "convergence.png"):
            md += ["![convergence](figures/convergence.png)", ""]
        md += ["| layer | n_params | Tr(H)/n | s.e. | rel. s.e. |", "|---|---|---|---|---|"]
        for r in traces["layers"]:
            se = float("inf") if r["stderr"] is None else r["stderr"]
            rel = se / abs(r["trace"]) if r["trace"] else float("inf")
            mark = "" if r.get("converged", True) else " *"
            md.append(f"| {r['fqn']}{mark} | {r['n_params']} | {r['trace']:.4g} | {se:.2g} | {100 * rel:.1f}% |")
        md.append("")
    exp = results.get("export")
    if exp:
        md += _export_section(exp, plan)
    stages = results.get("stages", {})
    if stages:
        md += ["## Wall time", "", "| stage | seconds |", "|---|---|"]
        md += [f"| {k} | {v['wall_s']:.1f} |" for k, v in stages.items()] + [""]
    path = run.report
    _atomic_write_bytes(path, "\n".join(md).encode())
    return path
