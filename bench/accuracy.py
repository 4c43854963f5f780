"""Accuracy of HAWQ-V2 against baseline allocators at equal size budgets; writes docs/results.md.

For every seed (which sets the images used for traces, eigenvalues and Fisher, the random plans and the
fine-tuning order), every budget (the size of uniform b-bit weights) and every allocator of
`hawq.alloc.baselines`: size, BOPs, total Omega, top-1 before and after identical short quantization-aware
fine-tuning. Then 50 random plans at one budget: rank correlation of total Omega with the accuracy drop
before fine-tuning. The page shows mean and standard error over seeds, paired differences to HAWQ-V2,
and says where HAWQ-V2 does not win.

    .venv/bin/python bench/accuracy.py            # the full design (110 min on 2 shared cores, 2026-12-02)
    .venv/bin/python bench/accuracy.py --quick    # smoke run: seconds of fine-tuning, 1 budget, 1 seed
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from tqdm.auto import tqdm

from hawq.alloc import (
    ALLOCATORS,
    best_plan,
    eig_bound_plan,
    empirical_fisher,
    fisher_plan,
    make_plan,
    monotone_plan,
    random_plan,
    reversed_plan,
    sensitivity_table,
    sizing_table,
    top_eigenvalues,
    uniform_plan,
    v1_plan,
)
from hawq.artifacts import load_torch, save_torch
from hawq.config import RunConfig
from hawq.data.fashion_mnist import TensorDataset, batches
from hawq.hessian import estimate_traces, weights_hash
from hawq.quant import quantize_
from hawq.tasks import classification as task
from hawq.train import PostTrainConfig, TrainConfig, evaluate, post_train_, train

ROOT = Path(__file__).resolve().parents[1]
FULL = dict(budgets=[4.0, 3.0, 2.5, 2.25], seeds=[0, 1, 2], allocators=list(ALLOCATORS), ft_images=2560,
            test_images=5000, trace_images=2048, diag_images=512, eig_images=128, eig_iters=20, random_plans=50,
            random_budget=3.0, a_bits=4, act_budgets=[4.0, 3.0, 2.5, 2.25], ptq="on")
QUICK = dict(budgets=[2.5], seeds=[0], allocators=["uniform", "hawq"], ft_images=256, test_images=1000,
             trace_images=128, diag_images=64, eig_images=64, eig_iters=3, random_plans=4, random_budget=2.5, a_bits=0,
             act_budgets=[2.5], ptq="on")
PREVIOUS = "results_before_ptq.json"  # the full run before the post-training steps (docs/, beside the page)
CACHED = "loaded from the cache: computed earlier for the same weights and settings"
NAMES = {"uniform": "uniform", "random": "random", "reversed": "reversed", "v1": "HAWQ-V1 (eigenvalue / n)",
         "eigbound": "eigenvalue bound",
         "fisher": "empirical Fisher", "monotone": "monotone in trace", "hawq": "HAWQ-V2 (trace)",
         "diag": "HAWQ-V2 diagonal"}


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke settings (any flag below overrides)")
    ap.add_argument("--budgets", type=float, nargs="+", help="uniform bit widths whose sizes are the budgets")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--allocators", nargs="+", choices=ALLOCATORS)
    ap.add_argument("--ft-images", type=int, help="fine-tuning images per model")
    ap.add_argument("--test-images", type=int, help="first N test images for every evaluation")
    ap.add_argument("--trace-images", type=int, help="images for exact traces, diagonals and Fisher")
    ap.add_argument("--diag-images", type=int, help="images for the Hessian diagonal (HAWQ-V2 diagonal)")
    ap.add_argument("--eig-images", type=int, help="images for the top eigenvalues (HAWQ-V1)")
    ap.add_argument("--eig-iters", type=int, help="power iterations at most")
    ap.add_argument("--random-plans", type=int, help="random plans for the Omega/accuracy correlation")
    ap.add_argument("--random-budget", type=float)
    ap.add_argument("--a-bits", type=int, help="activation bits of the second table set (0: none)")
    ap.add_argument("--act-budgets", type=float, nargs="+", help="budgets of the activation tables")
    ap.add_argument("--ptq", choices=("on", "off"), help="post-training steps before evaluation and fine-tuning: "
                    "on = hawq's (clipped weight ranges, batch-norm re-estimation), off = max-scaled weights, float "
                    "statistics (the page before issue 16)")
    ap.add_argument("--checkpoint", help="fp32 checkpoint (default: the hawq model cache)")
    ap.add_argument("--work-dir", default=str(Path(os.environ.get("HAWQ_CACHE", Path.home() / ".cache/hawq"))
                                               / "bench"), help="per-seed trace cache")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--render", metavar="RUN_JSON", help="only rewrite --out from a run's raw JSON (no measuring)")
    args = ap.parse_args()
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def measures(model, data: TensorDataset, seed: int, free: list[str], a, progress: bool) -> dict:
    """Traces + diagonals, top eigenvalues and empirical Fisher of one seed's images (cached on disk)."""
    ident = [weights_hash(model), seed, a.trace_images, a.diag_images, a.eig_images, a.eig_iters, free, 2]
    key = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]
    path = Path(a.work_dir) / f"measures-seed{seed}-{key}.pt"
    if path.exists():
        return {**load_torch(path), "cached": str(path)}
    stream = lambda: batches(data, 128, shuffle=True, seed=1000 + seed)  # noqa: E731
    t0 = time.perf_counter()
    tr = estimate_traces(model, stream(), method="exact", rel_tol=1e-9, max_images=a.trace_images,
                         seed=seed, progress=progress)
    t1 = time.perf_counter()
    dg = estimate_traces(model, stream(), method="exact", rel_tol=1e-9, max_images=a.diag_images,
                         diagonal=True, seed=seed, progress=progress)
    t2 = time.perf_counter()
    eig = top_eigenvalues(model, stream(), free, iters=a.eig_iters, max_images=a.eig_images, seed=seed,
                          progress=progress)
    t3 = time.perf_counter()
    fisher = empirical_fisher(model, stream(), free, max_images=a.trace_images, progress=progress)
    out = {"traces": tr.means(), "diagonals": dg.diagonals, "n_images": tr.n_images, "eig": eig,
           "fisher": fisher, "wall_s": {"traces": t1 - t0, "diag": t2 - t1, "eig": t3 - t2,
                                        "fisher": time.perf_counter() - t3}}
    save_torch(path, out)
    return {**out, "cached": None}


def uniform_size_bytes(table, bits: float) -> float:
    """Size with every free layer at `bits` (fractional allowed), fixed layers at theirs (bytes)."""
    return (32 * table.other_params + sum(r.n_params * (r.bits[0] if r.fixed else bits) for r in table.layers)) / 8


def post_train_config(ptq: str) -> PostTrainConfig:
    return PostTrainConfig() if ptq == "on" else PostTrainConfig.off()


def quantized_copy(fp32, plan, data, ptq: str = "on"):
    """The plan on a copy of fp32, then the post-training steps (hawq.train.ptq) on the first training images."""
    model = quantize_(copy.deepcopy(fp32), plan)
    post_train_(model, lambda: batches(data.train, 256), post_train_config(ptq))
    return model


def allocate(name: str, tables: dict, budget: float, m: dict, seed: int):
    t = tables["trace"]
    if name == "diag":
        return make_plan(t, best_plan(tables["diag"], budget).w_bits)
    fns = {"uniform": lambda: uniform_plan(t, budget), "random": lambda: random_plan(t, budget, seed=seed),
           "reversed": lambda: reversed_plan(t, budget), "v1": lambda: v1_plan(t, budget, m["eig"]),
           "eigbound": lambda: eig_bound_plan(t, budget, m["eig"]),
           "fisher": lambda: fisher_plan(t, budget, m["fisher"]), "monotone": lambda: monotone_plan(t, budget),
           "hawq": lambda: best_plan(t, budget)}
    return fns[name]()


class Evaluator:
    """Top-1 before and after fine-tuning; identical (plan, seed) pairs are measured once."""

    def __init__(self, fp32, data, test: TensorDataset, a) -> None:
        self.fp32, self.data, self.test, self.a = fp32, data, test, a
        self.before: dict = {}
        self.after: dict = {}
        self.ft_s: list[float] = []
        self.eval_s: list[float] = []
        # scores kept on disk, so that a stopped run resumes where it was (same weights and settings)
        ident = [weights_hash(fp32), a.ptq, post_train_config(a.ptq).to_dict(), a.ft_images, a.test_images, 1]
        key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        self.store = Path(a.work_dir) / f"scores-{key}.json"
        if self.store.exists():
            saved = json.loads(self.store.read_text())
            self.before = saved["before"]
            self.after = {tuple(json.loads(k)): v for k, v in saved["after"].items()}

    def _save(self) -> None:
        self.store.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.store.with_suffix(".tmp")
        tmp.write_text(json.dumps({"before": self.before,
                                   "after": {json.dumps(list(k)): v for k, v in self.after.items()}}))
        os.replace(tmp, self.store)

    def __call__(self, plan, seed: int, finetune: bool = True) -> tuple[float, float | None]:
        key, model = json.dumps([plan.w_bits, plan.a_bits], sort_keys=True), None
        if key not in self.before:
            model = quantized_copy(self.fp32, plan, self.data, self.a.ptq)
            t0 = time.perf_counter()
            self.before[key] = evaluate(model, self.test)
            self.eval_s.append(time.perf_counter() - t0)
            self._save()
        if not finetune:
            return self.before[key], None
        if (key, seed) not in self.after:
            model = model if model is not None else quantized_copy(self.fp32, plan, self.data, self.a.ptq)
            cfg = TrainConfig(n_images=self.a.ft_images, batch_size=128, lr=0.005, weight_decay=1e-4, seed=seed)
            t0 = time.perf_counter()
            train(model, self.data.train, cfg, progress=False)
            self.ft_s.append(time.perf_counter() - t0)
            self.after[(key, seed)] = evaluate(model, self.test)
            self._save()
        return self.before[key], self.after[(key, seed)]


def with_acts(table, plan, a_bits: int):
    return make_plan(table, plan.w_bits, {r.fqn: r.bits[0] if r.fixed else a_bits for r in table.layers})


def mean_se(xs) -> tuple[float, float]:
    xs = np.asarray(xs, float)
    return float(xs.mean()), float(xs.std(ddof=1) / np.sqrt(len(xs))) if len(xs) > 1 else float("nan")


def pm(xs, digits: int = 2) -> str:
    m, s = mean_se(xs)
    return f"{m:.{digits}f}" if np.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def test_se(acc_a: float, acc_b: float, n_test: int) -> float:
    """Worst-case standard error (points) of the top-1 difference of two models on the same `n_test` images:
    McNemar's, with the two models' errors on disjoint images (the most disagreement their accuracies allow)."""
    d = min(1.0, (100.0 - acc_a) / 100.0 + (100.0 - acc_b) / 100.0)
    return 100.0 * float(np.sqrt(max(d, 0.0) / n_test))


def verdict(d: list[float], acc: float, acc_ref: float, n_test: int) -> str:
    """Paired differences d (allocator - HAWQ-V2 per seed): 'ahead' (HAWQ-V2 significantly ahead), 'behind'
    (the allocator significantly ahead) or 'close'. Significant: |mean| above both the 95% Student-t interval
    over seeds and twice the worst-case test-sampling error `test_se` (the seeds share the test images)."""
    m, s = mean_se(d)
    crit = float(stats.t.ppf(0.975, len(d) - 1)) if len(d) > 1 else 0.0
    margin = max(crit * (0.0 if np.isnan(s) else s), 2 * test_se(acc, acc_ref, n_test))
    return "ahead" if m < -margin else "behind" if m > margin else "close"


def section(rows: list[dict], a_bits: int | None, allocs: list[str], n_test: int,
            tally: dict | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """Tables per budget and the plain statements of where HAWQ-V2 does not win, as (kind, text): kind 'behind'
    (a baseline significantly ahead), 'close+' (a baseline ahead or equal, not significantly), 'same' (HAWQ-V2's
    own plans on every seed) or 'close-' (HAWQ-V2 ahead, not significantly).

    `tally`, when given, collects per phase how the paired comparisons came out (`verdict`), and the baselines
    that chose HAWQ-V2's own plans on every seed ('same')."""
    lines, losses = [], []
    tally = {} if tally is None else tally
    for budget in sorted({r["budget_bits"] for r in rows if r["a_bits"] == a_bits}, reverse=True):
        sub = [r for r in rows if r["a_bits"] == a_bits and r["budget_bits"] == budget]
        ref = {r["seed"]: r for r in sub if r["allocator"] == "hawq"}
        lines += [f"### Budget: size of uniform {budget:g}-bit weights ({sub[0]['budget_bytes'] / 1024:.1f} KiB)", "",
                  "| allocator | size KiB | GBOPs | total Omega | top-1 before FT | top-1 after FT "
                  "| Δ before vs HAWQ-V2 | Δ after vs HAWQ-V2 |", "|---|---|---|---|---|---|---|---|"]
        for name in allocs:
            rs = sorted((r for r in sub if r["allocator"] == name), key=lambda r: r["seed"])
            if not rs:
                continue
            cells = [NAMES[name], pm([r["size_bytes"] / 1024 for r in rs], 1),
                     pm([r["bops"] / 1e9 for r in rs], 2), pm([r["omega"] for r in rs], 4),
                     pm([r["before"] for r in rs]), pm([r["after"] for r in rs])]
            where = f"uniform-{budget:g}-bit budget{'' if a_bits is None else f', {a_bits}-bit activations'}"
            paired = [r for r in rs if r["seed"] in ref]
            same = name != "hawq" and bool(paired) and len(paired) == len(rs) and all(
                r["w_bits"] == ref[r["seed"]]["w_bits"] for r in paired)
            if same:
                losses.append(("same", f"{where}: {NAMES[name]}"))
            for phase in ("before", "after"):
                if name == "hawq" or not paired or same:
                    cells.append("same plans" if same else "—")
                    if same:
                        tally.setdefault(phase, {}).setdefault("same", []).append((budget, name))
                    continue
                d = [r[phase] - ref[r["seed"]][phase] for r in paired]
                cells.append(pm(d))
                v = verdict(d, float(np.mean([r[phase] for r in paired])),
                            float(np.mean([ref[r["seed"]][phase] for r in paired])), n_test)
                tally.setdefault(phase, {}).setdefault(v, []).append((budget, name))
                m, s = mean_se(d)
                pm_s = "" if np.isnan(s) else f" ± {s:.2f}"
                head = f"{where}, {phase} fine-tuning: "
                if v == "behind":
                    losses.append(("behind", f"{head}{NAMES[name]} is ahead of HAWQ-V2 by {m:.2f}{pm_s} points"))
                elif v == "close" and m > 0:
                    losses.append(("close+", f"{head}{NAMES[name]} is ahead of HAWQ-V2 by {m:.2f}{pm_s} points"))
                elif v == "close" and m < 0:
                    losses.append(("close-", f"{head}HAWQ-V2 is ahead of {NAMES[name]} by {-m:.2f}{pm_s} points"))
                elif v == "close":
                    losses.append(("close+", f"{head}{NAMES[name]} and HAWQ-V2 are equal on average (Δ = 0.00{pm_s})"))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines, losses


def leads(rows: list[dict], a_bits: int | None, allocs: list[str], n_test: int) -> dict:
    """HAWQ-V2's lead over each baseline, (budget, name, phase) -> (mean, se, verdict): mean of HAWQ-V2 minus
    the baseline per seed (points; positive = HAWQ-V2 ahead), `verdict` as in `section` ('same': the
    baseline chose HAWQ-V2's own plans on every seed)."""
    out = {}
    for budget in sorted({r["budget_bits"] for r in rows if r["a_bits"] == a_bits}, reverse=True):
        sub = [r for r in rows if r["a_bits"] == a_bits and r["budget_bits"] == budget]
        ref = {r["seed"]: r for r in sub if r["allocator"] == "hawq"}
        for name in allocs:
            rs = [r for r in sub if r["allocator"] == name and r["seed"] in ref]
            if name == "hawq" or not rs:
                continue
            same = all(r["w_bits"] == ref[r["seed"]]["w_bits"] for r in rs)
            for phase in ("before", "after"):
                d = [r[phase] - ref[r["seed"]][phase] for r in rs]
                m, se = mean_se(d)
                v = "same" if same else verdict(d, float(np.mean([r[phase] for r in rs])),
                                                float(np.mean([ref[r["seed"]][phase] for r in rs])), n_test)
                out[(budget, name, phase)] = (-m, se, v)
    return out


def change(old: str, new: str, lead_old: float, lead_new: float) -> str:
    """How a significant lead of HAWQ-V2 ('ahead') fared from the earlier run to this one."""
    if old == "ahead" and new == "ahead":
        return "held, grew" if lead_new > lead_old else "held, shrank"
    if old == "ahead":
        return "vanished (a tie: same plans)" if new == "same" else "vanished (baseline ahead)" if new == "behind" \
            else "vanished"
    if new == "ahead":
        return "appeared"
    return "baseline ahead" if "behind" in (old, new) else "no lead before or after"


def previous_lines(run: dict, prev: dict, prev_name: str, allocs: list[str]) -> list[str]:
    """The section comparing this run's paired verdicts with an earlier run's (the page before the
    post-training steps): where HAWQ-V2's significant lead grew, held, vanished or appeared."""
    a_bits = run["settings"].get("a_bits") or None
    sets = [(None, "weights only")] + ([(a_bits, f"{a_bits}-bit activations")] if a_bits else [])
    n_old, n_new = prev["test_images"], run["test_images"]
    seeds_old, seeds_new = prev["settings"]["seeds"], run["settings"]["seeds"]
    L = ["## Against the page before the post-training steps", "",
         f"The same comparisons in the run before the post-training steps existed (max-scaled weights, float "
         f"batch-norm statistics; its raw records: [{prev_name}]({prev_name}), {prev['finished']}, seeds "
         f"{seeds_old}, {n_old} test images; this run: seeds {seeds_new}, {n_new} test images). A lead is "
         "HAWQ-V2's top-1 minus the baseline's, mean over seeds; it counts only where significant by the summary's "
         "test in its own run. Grew / shrank compare the two means.", ""]
    table = []
    for ab, title in sets:
        old = leads(prev["rows"], ab, allocs, n_old)
        new = leads(run["rows"], ab, allocs, n_new)
        for phase in ("before", "after"):
            groups: dict[str, list[str]] = {}
            for key in new:
                if key[2] != phase or key not in old:
                    continue
                (lo, _, vo), (ln, _, vn) = old[key], new[key]
                c = change(vo, vn, lo, ln)
                groups.setdefault(c.split(" (")[0], []).append(
                    f"{NAMES[key[1]]} at {key[0]:g} bits ({lo:+.2f} → {ln:+.2f})")
                table.append(f"| {title} | {phase} | {key[0]:g} | {NAMES[key[1]]} | {lo:+.2f} ({vo}) | "
                             f"{ln:+.2f} ({vn}) | {c} |")
            n = sum(len(v) for v in groups.values())
            if not n:
                continue
            L.append(f"- {title.capitalize()}, {phase} fine-tuning, {n} comparisons:")
            for word, label in (("held, grew", "lead held and grew"), ("held, shrank", "lead held and shrank"),
                                ("vanished", "lead vanished"), ("appeared", "lead appeared"),
                                ("baseline ahead", "a baseline significantly ahead in one of the runs"),
                                ("no lead before or after", "no significant lead in either run")):
                items = groups.get(word, [])
                if items and word != "no lead before or after":
                    L.append(f"  - {label} ({len(items)}): " + "; ".join(items) + ".")
                elif items:
                    L.append(f"  - {label}: {len(items)}.")
    L += ["", "<details><summary>Every comparison</summary>", "",
          "| set | phase | budget (bits) | baseline | lead before the steps (verdict) | lead now (verdict) | change |",
          "|---|---|---|---|---|---|---|", *table, "", "</details>", ""]
    return L


def summary_lines(title: str, tally: dict) -> list[str]:
    out = []
    for phase in ("before", "after"):
        t = tally.get(phase, {})
        n = sum(len(v) for v in t.values())
        if not n:
            continue
        part = {k: len(v) for k, v in t.items()}.get
        behind = "; ".join(f"{NAMES[nm]} at {b:g} bits" for b, nm in t.get("behind", []))
        out.append(f"- {title}, {phase} fine-tuning: of {n} comparisons HAWQ-V2 is ahead in {part('ahead', 0)}, "
                   f"not significantly different in {part('close', 0)}, behind in {part('behind', 0)}"
                   + (f" ({behind})" if behind else "") + f", and {part('same', 0)} chose HAWQ-V2's own plans.")
    return out


def sensitivity_lines(run: dict) -> list[str]:
    """How the per-layer scores of the baselines relate to the traces (runs that recorded them)."""
    sens = run.get("sensitivities")
    if not sens:
        return []
    out = []
    for key, label in (("fisher", "empirical Fisher"), ("eig_n", "top eigenvalue / n"), ("eig", "top eigenvalue")):
        if any(key not in s for s in sens.values()):
            continue
        rhos, ratios = [], []
        for s in sens.values():
            f = sorted(s["traces"])
            t, o = np.array([s["traces"][x] for x in f]), np.array([s[key][x] for x in f])
            rhos.append(stats.spearmanr(t, o)[0])
            ratios.append(o / t)
        r = np.concatenate(ratios)
        out.append(f"- Per-layer {label} against the trace, over the {len(f)} free layers: Spearman "
                   f"{min(rhos):.3f} to {max(rhos):.3f} across seeds; ratio {label} / trace {r.min():.3g} to "
                   f"{r.max():.3g}.")
    return out


def figure(rows: list[dict], a_bits: int | None, path: Path, allocs: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for ax, phase in zip(axes, ("before", "after")):
        for name in allocs:
            pts = []
            for budget in sorted({r["budget_bits"] for r in rows}):
                rs = [r for r in rows
                      if r["allocator"] == name and r["budget_bits"] == budget and r["a_bits"] == a_bits]
                if rs:
                    pts.append((np.mean([r["size_bytes"] / 1024 for r in rs]), *mean_se([r[phase] for r in rs])))
            if pts:
                x, y, e = zip(*pts)
                # HAWQ-V2 on top in black, drawn last, so baselines with the same plans do not hide it
                style = dict(color="black", lw=2.5, zorder=5, ms=7) if name == "hawq" else dict(lw=1.2, alpha=0.8)
                ax.errorbar(x, y, yerr=np.nan_to_num(e), marker="o", capsize=3, label=NAMES[name], **style)
        ax.set_xlabel("model size (KiB)")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{phase} fine-tuning" + ("" if a_bits is None else f", {a_bits}-bit activations"))
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    t_start, load_start = time.perf_counter(), os.getloadavg()
    progress = not a.quiet
    cfg = RunConfig() if a.checkpoint is None else RunConfig(checkpoint=a.checkpoint)
    data = task.load_data(cfg)
    test = data.test.subset(a.test_images)
    fp32, record = task.full_precision_model(cfg, data, progress=progress)
    fp32_top1 = evaluate(fp32, test)
    x1 = data.train.images[:1]
    ev, rows, meas = Evaluator(fp32, data, test, a), [], {}
    sizing = sizing_table(fp32).layers
    free = [r.fqn for r in sizing if not r.fixed]
    n_params = {r.fqn: r.n_params for r in sizing}
    for seed in a.seeds:
        m = meas[seed] = measures(fp32, data.train, seed, free, a, progress)
        wr = post_train_config(a.ptq).weight_range  # Omega of the quantizer the models get
        tables = {"trace": sensitivity_table(fp32, m["traces"], example_input=x1, progress=False, weight_range=wr),
                  "diag": sensitivity_table(fp32, m["traces"], diagonals=m["diagonals"], example_input=x1,
                                            progress=False, weight_range=wr)}
        sets = [(None, a.budgets)] + ([(a.a_bits, a.act_budgets)] if a.a_bits else [])
        jobs = [(ab, b, n) for ab, bs in sets for b in bs for n in a.allocators]
        for ab, bits, name in tqdm(jobs, desc=f"seed {seed}", disable=not progress):
            budget = uniform_size_bytes(tables["trace"], bits)
            plan = allocate(name, tables, budget, m, seed)
            if ab:
                plan = with_acts(tables["trace"], plan, ab)
            before, after = ev(plan, seed)
            rows.append({"seed": seed, "budget_bits": bits, "budget_bytes": budget, "allocator": name,
                         "a_bits": ab, "size_bytes": plan.size_bytes, "bops": plan.bops, "omega": plan.omega,
                         "omega_diag": make_plan(tables["diag"], plan.w_bits).omega,
                         "w_bits": plan.w_bits, "before": before, "after": after})
        if seed == a.seeds[0]:
            corr_table, diag_table = tables["trace"], tables["diag"]
    budget = uniform_size_bytes(corr_table, a.random_budget)
    rand = []
    for k in tqdm(range(a.random_plans), desc="random plans", disable=not progress):
        p = random_plan(corr_table, budget, seed=10_000 + k)
        rand.append({"omega": p.omega, "omega_diag": make_plan(diag_table, p.w_bits).omega,
                     "size_bytes": p.size_bytes, "drop": fp32_top1 - ev(p, 0, finetune=False)[0]})
    run = {"settings": {k: getattr(a, k) for k in FULL} | {"threads": a.threads}, "test_images": a.test_images,
           "sensitivities": {s: {k: {f: float(m[k][f]) for f in free} for k in ("traces", "fisher", "eig")}
                             | {"eig_n": {f: float(m["eig"][f]) / n_params[f] for f in free}}
                             for s, m in meas.items()},
           "argv": ["bench/accuracy.py", *sys.argv[1:]], "rows": rows, "random": rand,
           "measures": {s: {"wall_s": m["wall_s"], "cached": m["cached"]} for s, m in meas.items()},
           "source": record["source"], "fp32_top1": fp32_top1, "ft_s": ev.ft_s, "eval_s": ev.eval_s,
           "wall_s": time.perf_counter() - t_start, "load": [load_start[0], os.getloadavg()[0]],
           "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} "
                      f"logical cores, torch {torch.__version__} with {torch.get_num_threads()} threads",
           "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    raw = Path(a.out).with_suffix(".json")
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(run, indent=1))
    write_page(run, Path(a.out), raw)


def ptq_line(ptq: str) -> str:
    if ptq == "on":
        return ("- Post-training steps (`hawq.train.ptq`), before the \"before FT\" score and before fine-tuning: "
                "every weight channel clipped at the ratio of its largest magnitude that minimises ||Q(W)−W||² "
                "(grid 1.00, 0.99, ..., 0.06), and batch-norm running statistics re-estimated in train mode on the "
                "first 4096 training images, weights frozen; activation ranges (4-bit tables) on 2048 training images "
                "before and after, each the clip of [min, max] that minimises the mean squared error of Q(x). "
                "Omega and ||Q(W)−W||² are those of the clipped quantizer.")
    return ("- No post-training steps: weights scaled by each channel's largest magnitude, batch-norm statistics "
            "of the float model; activations (4-bit tables) min/max-calibrated on 2048 training images.")


def full_command(argv: list[str]) -> str:
    """The full-design command: no setting flags, the same fp32 checkpoint."""
    ck = [argv[i + 1] for i, x in enumerate(argv[:-1]) if x == "--checkpoint"]
    return ".venv/bin/python bench/accuracy.py" + (f" --checkpoint {shlex.quote(ck[0])}" if ck else "")


def write_page(run: dict, out: Path, raw: Path) -> None:
    a = argparse.Namespace(**({"ptq": "off"} | run["settings"]))  # runs before the setting had no steps
    rows, rand, meas = run["rows"], run["random"], run["measures"]
    fig_dir = out.parent / "figures"
    allocs = [n for n in ALLOCATORS if n in a.allocators]
    reduced = {k: getattr(a, k) for k in FULL if getattr(a, k) != FULL[k]}
    if not a.a_bits:
        reduced.pop("act_budgets", None)
    L = ["# Results: HAWQ-V2 against baseline allocators", "",
         f"Generated by `.venv/bin/python {' '.join(shlex.quote(x) for x in run['argv'])}` on "
         f"{run['finished']}; every number on this page comes from that run (its raw records: "
         f"[{raw.name}]({raw.name})).", ""]
    if run.get("rendered"):
        L += [f"Page rendered again from those raw records on {run['rendered']} (`--render`) after a change to "
              "its layout and wording; the numbers are the run's.", ""]
    if reduced:
        L += ["**This is a REDUCED run**, not the full design; settings that differ from the full defaults: "
              + ", ".join(f"`{k}={v}` (full: `{FULL[k]}`)" for k, v in reduced.items()) + ". "
              f"Full run: `{full_command(run['argv'])}`.", ""]
    L += ["## Task and settings", "",
          f"- ResNet-20 on Fashion-MNIST; full-precision model from {run['source']}; "
          f"top-1 {run['fp32_top1']:.2f}% on the test images used here.",
          f"- Evaluation: the first {a.test_images} test images (the same for every model). One test-set "
          f"binomial standard error at 90% is {100 * np.sqrt(0.09 / a.test_images):.2f} points; paired "
          "differences on the same images vary less.",
          "- Weights only quantized (per-channel symmetric), first and last layer fixed at 8 bits, candidate "
          "widths {2, 3, 4, 8}. Budget = size of uniform b-bit weights (fractional b: n·b bits per free layer).",
          ptq_line(getattr(a, "ptq", "off")),
          f"- Seeds {a.seeds}: a seed sets the images of traces/eigenvalues/Fisher, the random plan and the "
          "fine-tuning order.",
          f"- Traces: exact (per-image Gauss-Newton = Hessian for this ReLU net) on {a.trace_images} training "
          f"images; Hessian diagonal (exact Gauss-Newton) on the first {a.diag_images} of them; HAWQ-V1 "
          f"eigenvalues: power iteration (Gauss-Newton block products, tolerance 1e-3), at most "
          f"{a.eig_iters} products per layer on the first {a.eig_images}; empirical Fisher on {a.trace_images}.",
          f"- Fine-tuning (identical for all): {a.ft_images} images, SGD Nesterov momentum 0.9, lr 0.005 cosine, "
          "batch 128, weight decay 1e-4, straight-through estimator.",
          "- Total Omega is HAWQ-V2's (trace) Omega of each plan, whichever allocator chose it.",
          "- Allocators: uniform = the largest single width that fits (at 2.5 and 2.25 bits that is 2 bits, "
          "so it spends less than the budget); random = log-uniform random per-layer scores through the same "
          "exact knapsack; reversed = 1/trace as the score; HAWQ-V1 = its sensitivity λ/n (top eigenvalue "
          "of the layer's Hessian block per parameter) × ||Q(W)−W||²; eigenvalue bound = λ × ||Q(W)−W||², "
          "the worst case over directions (an upper bound on the second-order loss change); empirical "
          "Fisher = mean squared per-image gradient (true labels) × ||Q(W)−W||²; monotone = widths "
          "non-increasing in descending trace order, least Omega among those plans; HAWQ-V2 = trace × "
          "||Q(W)−W||² (exact knapsack); diagonal = ½ Σ H_jj (Q(W)_j − W_j)².",
          "- Mean ± standard error over seeds; Δ = allocator − HAWQ-V2 per seed (paired), mean ± standard error. "
          "The standard errors hold seed-to-seed variation only (± 0.00: the same result on every seed, e.g. "
          "one plan evaluated before fine-tuning on the same images); the test-image sampling error above is "
          "not in them.",
          ""]
    sections = [(None, "Weights only")] + ([(a.a_bits, f"Weights and {a.a_bits}-bit activations")] if a.a_bits else [])
    all_losses, summary = [], []
    body = []
    for ab, title in sections:
        tally: dict = {}
        lines, losses = section(rows, ab, allocs, a.test_images, tally)
        all_losses += losses
        summary += summary_lines(title, tally)
        name = "results_accuracy_vs_size" + ("" if ab is None else f"_a{ab}") + ".png"
        figure(rows, ab, fig_dir / name, allocs)
        body += [f"## {title}", "", f"![accuracy versus size](figures/{name})", "", *lines]
    crit = float(stats.t.ppf(0.975, len(a.seeds) - 1)) if len(a.seeds) > 1 else 0.0
    L += ["## Summary", "", "Each comparison is one baseline at one budget, paired by seed with HAWQ-V2. \"Ahead\" "
          "and \"behind\" mean significantly: the mean paired difference exceeds both the 95% Student-t interval "
          f"over seeds ({crit:.2f} standard errors for {len(a.seeds)} seeds) and twice the worst-case "
          f"test-sampling error of a paired difference on the same {a.test_images} images (McNemar, with the two "
          "models' errors on disjoint images: 100·sqrt((e₁ + e₂)/N) points, 0.6 points for two models at 91%)"
          + (" (one seed here: no interval over seeds)." if len(a.seeds) < 2 else "."), "",
          *summary, *sensitivity_lines(run), "", *body]
    prev_path = out.parent / PREVIOUS
    if getattr(a, "ptq", "off") == "on" and prev_path.exists():
        L += previous_lines(run, json.loads(prev_path.read_text()), PREVIOUS, allocs)
    L += ["## Where HAWQ-V2 does not win", "",
          "Every comparison in which HAWQ-V2 was not significantly ahead (see the summary for the test):", ""]
    groups = [("behind", "A baseline significantly ahead of HAWQ-V2"),
              ("close+", "A baseline ahead of HAWQ-V2 or equal, not significantly"),
              ("same", "A baseline that chose HAWQ-V2's own plans on every seed (a tie)"),
              ("close-", "HAWQ-V2 ahead, but not significantly")]
    for kind, heading in groups:
        found = [text for k, text in all_losses if k == kind]
        L += [f"### {heading} ({len(found)})", "", *([f"- {t}" for t in found] or ["- none"]), ""]
    if not all_losses:
        L += ["Nowhere in this run: HAWQ-V2 was significantly ahead of every baseline at every budget.", ""]
    if rand:
        om, dg, dr = (np.array([r[k] for r in rand]) for k in ("omega", "omega_diag", "drop"))
        rho, p = stats.spearmanr(om, dr)
        rho_d, p_d = stats.spearmanr(dg, dr)
        L += ["", f"## Does Omega predict damage? ({len(rand)} random plans, budget of uniform {a.random_budget:g}-bit"
              f" weights, seed {a.seeds[0]}'s traces)", "",
              f"Spearman rank correlation between total Omega and the top-1 drop before fine-tuning: "
              f"**{rho:.3f}** (p = {p:.2g}); with the diagonal Omega: **{rho_d:.3f}** (p = {p_d:.2g}). "
              f"Drops ranged {dr.min():.2f} to {dr.max():.2f} points (median {np.median(dr):.2f}); sizes "
              f"{min(r['size_bytes'] for r in rand) / 1024:.1f}-{max(r['size_bytes'] for r in rand) / 1024:.1f} KiB; "
              f"{len({round(x, 12) for x in om})} distinct plans."]
    wall, ft_s, eval_s = run["wall_s"], run["ft_s"], run["eval_s"]
    mw = {s: m["wall_s"] for s, m in meas.items()}
    found = re.search(r"(\d+) logical cores", run["machine"])  # the run's machine, not this one
    cores = int(found.group(1)) if found else os.cpu_count() or 1
    threads = run["settings"].get("threads", 2)
    busy = run["load"][0] > max(cores - threads, 0) + 0.5 or run["load"][1] > cores + 0.5
    L += ["", "## Machine and cost", "",
          f"- {run['machine']}; load average (1 min) at start {run['load'][0]:.1f}, at end {run['load'][1]:.1f}"
          + (": more than the run's own threads account for, so other work shared the machine for part of the "
             "run and the wall times may be inflated." if busy else "."),
          f"- Total wall time {wall / 60:.1f} min. Per seed (traces, diagonal, eigenvalues, Fisher, s): "
          + "; ".join(f"seed {s}: {w['traces']:.0f}, {w['diag']:.0f}, {w['eig']:.0f}, {w['fisher']:.0f}"
                      + (f" ({CACHED})" if meas[s]["cached"] else "") for s, w in mw.items()) + ".",
          f"- Fine-tuning runs: {len(ft_s)}, median {np.median(ft_s) if ft_s else 0:.1f} s; "
          f"evaluations: {len(eval_s)} before fine-tuning (+{len(ft_s)} after), median "
          f"{np.median(eval_s) if eval_s else 0:.1f} s (identical plan and seed pairs are measured once).", ""]
    write_lines(out, L + raw_rows(rows), wall)


def raw_rows(rows: list[dict]) -> list[str]:
    """The page's last section: every row as a JSON line (w_bits as a list), folded away."""
    return ["## Raw per-seed results", "", "<details><summary>JSON lines</summary>", "", "```",
            *(json.dumps({k: v for k, v in r.items() if k != "w_bits"}
                         | {"w_bits": None if r["w_bits"] is None else list(r["w_bits"].values())}) for r in rows),
            "```", "", "</details>", ""]


def write_lines(out: Path, lines: list[str], wall: float) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out} ({wall / 60:.1f} min run)", file=sys.stderr)


if __name__ == "__main__":
    args = parse()
    if args.render:
        recorded = json.loads(Path(args.render).read_text())
        recorded["rendered"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        write_page(recorded, Path(args.out), Path(args.render))
    else:
        main(args)
