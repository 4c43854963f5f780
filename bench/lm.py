"""Perplexity of HAWQ-V2 against uniform and baseline allocators on the language-model task; writes docs/lm.md.

The task is `hawq.tasks.lm` (a small GPT-style byte model, hawq.models.char_gpt, on the standard library's own
*.py files). For every seed (which sets the sequences of the traces and the empirical Fisher, the random plan
and the fine-tuning order), every budget (the size of uniform b-bit weights) and every allocator: size, total
Omega, validation perplexity after the post-training steps ("before FT") and after the task's own fine-tuning
(`LanguageModelTask.finetune`, as `hawq run --task lm` does it; identical for every plan, and for the
full-precision model as a control). The page shows mean and standard error over seeds and paired differences to
HAWQ-V2, with the significance rule of docs/results.md (bench/accuracy.py), and compares how much allocation
matters here with ResNet-20's numbers in docs/results.json.

    .venv/bin/python bench/lm.py                  # the full design (FULL: ~30 min on 2 busy cores, 1 thread,
                                                  # plus ~10 min to train the fp32 model the first time)
    .venv/bin/python bench/lm.py --quick          # smoke run: a tiny model, 1 budget, 1 seed, seconds
    .venv/bin/python bench/lm.py --render docs/lm.json   # rewrite the page from a run's raw records
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from tqdm.auto import tqdm

from hawq.alloc import default_fixed, empirical_fisher, sensitivity_table
from hawq.artifacts import load_torch, save_torch
from hawq.config import RunConfig
from hawq.hessian import estimate_traces, weights_hash
from hawq.pipeline import quantized_copy
from hawq.tasks import task_class

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_accuracy", Path(__file__).with_name("accuracy.py"))
acc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(acc)  # helpers shared with the ResNet-20 page: allocate, budgets, mean ± SE

FULL = dict(budgets=[4.0, 3.0, 2.5], seeds=[0, 1, 2], allocators=["uniform", "random", "reversed", "fisher", "hawq"],
            ft_sequences=8192, val_windows=2048, trace_sequences=1024, fisher_sequences=512, fp32_sequences=None)
QUICK = dict(budgets=[2.5], seeds=[0], allocators=["uniform", "hawq"], ft_sequences=128, val_windows=64,
             trace_sequences=64, fisher_sequences=64, fp32_sequences=640)
BLOCK = 16  # validation windows per block of the test-sampling error (neighbouring windows share a file)
NAMES = {**acc.NAMES, "fp32": "full precision"}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke settings (any flag below overrides)")
    ap.add_argument("--budgets", type=float, nargs="+", help="uniform bit widths whose sizes are the budgets")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--allocators", nargs="+", choices=("uniform", "random", "reversed", "fisher", "monotone", "hawq"))
    ap.add_argument("--ft-sequences", type=int, help="fine-tuning sequences per model (the task's finetune)")
    ap.add_argument("--val-windows", type=int, help="first N validation windows for every evaluation")
    ap.add_argument("--trace-sequences", type=int, help="most sequences for the traces (stops at 5%% earlier)")
    ap.add_argument("--fisher-sequences", type=int, help="sequences for the empirical Fisher")
    ap.add_argument("--fp32-sequences", type=int, help="training sequences of the fp32 model (default: the task's)")
    ap.add_argument("--checkpoint", help="fp32 checkpoint (default: the hawq model cache)")
    ap.add_argument("--work-dir", default=str(Path(os.environ.get("HAWQ_CACHE", Path.home() / ".cache/hawq"))
                                               / "bench"), help="per-seed trace cache")
    ap.add_argument("--out", default=str(ROOT / "docs" / "lm.md"))
    ap.add_argument("--results", default=str(ROOT / "docs" / "results.json"),
                    help="ResNet-20's raw records (bench/accuracy.py) for the comparison")
    ap.add_argument("--note", default="", help="a line for the page's machine section (what else ran)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--render", metavar="RUN_JSON", help="only rewrite --out from a run's raw JSON (no measuring)")
    a = ap.parse_args(argv)
    for k, v in (QUICK if a.quick else FULL).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def lm_task(cfg: RunConfig, fp32_sequences: int | None):
    """A fresh LanguageModelTask (not the shared registry instance) whose fp32 training takes `fp32_sequences`."""
    task = task_class("lm", cfg.dataset)()
    if fp32_sequences is not None:  # full_precision_model trains train_sequences (/16 under --quick) per epoch
        task.train_sequences = fp32_sequences * (16 if cfg.quick else 1)
    return task


@torch.inference_mode()
def window_losses(model: torch.nn.Module, val: torch.Tensor, batch_size: int = 256) -> tuple[np.ndarray, float]:
    """Mean next-byte cross-entropy of every validation window (N,) and top-1 %; every window has the same
    number of tokens, so exp(mean) is the task's perplexity (LanguageModelTask.evaluate)."""
    ce, correct = [], 0
    for i in range(0, len(val), batch_size):
        w = val[i : i + batch_size].long()
        logits = model(w[:, :-1])
        ce.append(F.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none").mean(1).double())
        correct += int((logits.argmax(-1) == w[:, 1:]).sum())
    return torch.cat(ce).numpy(), 100.0 * correct / val[:, 1:].numel()


def paired_test_se(ce_a: np.ndarray, ce_b: np.ndarray) -> float:
    """Standard error (perplexity units) of the difference of two models' perplexities on the same windows from
    the windows' sampling: block means of the per-window cross-entropy difference (blocks of BLOCK neighbouring
    windows, which come from the same files), by the delta method at the two models' mean perplexity."""
    d = ce_a - ce_b
    n = len(d) // BLOCK
    blocks = d[: n * BLOCK].reshape(n, BLOCK).mean(1) if n >= 2 else d
    se_ce = float(blocks.std(ddof=1) / math.sqrt(len(blocks))) if len(blocks) > 1 else 0.0
    return 0.5 * (math.exp(ce_a.mean()) + math.exp(ce_b.mean())) * se_ce


def measures(model, task, cfg: RunConfig, data, seed: int, free: list[str], a, progress: bool) -> dict:
    """gn_residual traces and empirical Fisher on one seed's training sequences (cached on disk)."""
    ident = [weights_hash(model), seed, a.trace_sequences, a.fisher_sequences, cfg.trace_rel_tol,
             cfg.trace_batch_size, cfg.trace_chunk, len(data.train), free, "lm", 1]
    key = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]
    path = Path(a.work_dir) / f"lm-measures-seed{seed}-{key}.pt"
    if path.exists():
        return {**load_torch(path), "cached": str(path)}
    cs = cfg.replace(seed=seed)
    t0 = time.perf_counter()
    tr = estimate_traces(model, task.trace_batches(cs, data), method="gn_residual", loss=task.trace_loss(model),
                         rel_tol=cfg.trace_rel_tol, max_images=a.trace_sequences, chunk_size=cfg.trace_chunk,
                         seed=seed, progress=progress)
    t1 = time.perf_counter()
    fisher = empirical_fisher(model, task.trace_batches(cs, data), free, max_images=a.fisher_sequences,
                              progress=progress)
    total = sum(lt.n_params * abs(lt.trace) for lt in tr.layers)
    out = {"traces": tr.means(), "fisher": fisher, "n_images": tr.n_images, "method": tr.method,
           "converged": tr.converged, "notes": list(tr.notes),
           "layers": [{"fqn": lt.fqn, "n_params": lt.n_params, "trace": lt.trace,
                       "rel_se": lt.rel_stderr if math.isfinite(lt.rel_stderr) else None,
                       "share": lt.n_params * abs(lt.trace) / total if total else 0.0} for lt in tr.layers],
           "wall_s": {"traces": t1 - t0, "fisher": time.perf_counter() - t1}}
    save_torch(path, out)
    return {**out, "cached": None}


class Evaluator:
    """Perplexity before and after fine-tuning; identical (plan, seed) pairs are measured once. Keeps every
    model's per-window cross-entropy for the paired test-sampling errors."""

    def __init__(self, task, fp32, data, cfg: RunConfig, a) -> None:
        self.task, self.fp32, self.data, self.cfg, self.a = task, fp32, data, cfg, a
        self.val = data.val[: a.val_windows]
        self.before: dict = {}
        self.after: dict = {}
        self.ft_s: list[float] = []
        self.eval_s: list[float] = []

    def score(self, model) -> dict:
        t0 = time.perf_counter()
        ce, top1 = window_losses(model, self.val)
        self.eval_s.append(time.perf_counter() - t0)
        return {"ppl": math.exp(ce.mean()), "top1": top1, "ce": ce}

    def tune(self, model, seed: int) -> dict:
        t0 = time.perf_counter()
        self.task.finetune(model, self.data, self.cfg.replace(seed=seed), self.a.ft_sequences, teacher=None,
                           progress=False, desc="finetune")
        self.ft_s.append(time.perf_counter() - t0)
        return self.score(model)

    def __call__(self, plan, seed: int) -> tuple[dict, dict]:
        key, model = json.dumps([plan.w_bits, plan.a_bits], sort_keys=True), None
        if key not in self.before:
            model = quantized_copy(self.task, self.fp32, plan, self.data, self.cfg)  # post-training steps
            self.before[key] = self.score(model)
        if (key, seed) not in self.after:
            model = model if model is not None else quantized_copy(self.task, self.fp32, plan, self.data, self.cfg)
            self.after[(key, seed)] = self.tune(model, seed)
        return self.before[key], self.after[(key, seed)]


def verdict(d: list[float], test_se: float) -> str:
    """docs/results.md's rule on paired differences d (allocator − HAWQ-V2 perplexity, per seed; lower is better):
    'ahead' (HAWQ-V2 significantly lower), 'behind' (the allocator significantly lower) or 'close'. Significant:
    |mean| above both the 95% Student-t interval over seeds and twice the test-sampling error `test_se`."""
    m, s = acc.mean_se(d)
    crit = float(stats.t.ppf(0.975, len(d) - 1)) if len(d) > 1 else 0.0
    margin = max(crit * (0.0 if np.isnan(s) else s), 2 * test_se)
    return "ahead" if m > margin else "behind" if m < -margin else "close"


def main(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    t_start, load_start = time.perf_counter(), os.getloadavg()
    progress = not a.quiet
    cfg = RunConfig(task="lm", quick=a.quick, checkpoint=a.checkpoint)
    task = lm_task(cfg, a.fp32_sequences)
    data = task.load_data(cfg)
    t0 = time.perf_counter()
    fp32, record = task.full_precision_model(cfg, data, progress=progress)
    fp32_s = time.perf_counter() - t0
    n_fp32 = (task.train_sequences // 16 if cfg.quick else task.train_sequences) * cfg.epochs  # as the task trains
    example = task.example_input(data)
    fixed = task.fixed_layers(fp32) or default_fixed(fp32, example)
    free = [n for n, mod in fp32.named_modules() if isinstance(mod, torch.nn.Linear) and n not in fixed]
    ev = Evaluator(task, fp32, data, cfg, a)
    ref = ev.score(fp32)
    check = task.evaluate(fp32, dataclasses.replace(data, val=ev.val), progress=False)["ppl"]
    if not math.isclose(check, ref["ppl"], rel_tol=1e-4):
        raise RuntimeError(f"per-window perplexity {ref['ppl']} differs from the task's {check}")
    run = {"settings": {k: getattr(a, k) for k in FULL} | {"threads": a.threads, "quick": a.quick},
           "argv": ["bench/lm.py", *sys.argv[1:]], "source": record["source"], "fp32_ppl": ref["ppl"],
           "fp32_top1": ref["top1"], "fp32_s": fp32_s, "fp32_train": {"n_sequences": n_fp32, "lr": cfg.lr,
                                                                      "batch_size": cfg.batch_size},
           "fp32_size_bytes": 4.0 * sum(p.numel() for p in fp32.parameters()),
           "n_params": sum(p.numel() for p in fp32.parameters()), "n_val": len(ev.val),
           "n_train_bytes": len(data.train), "data_source": data.source, "fixed": fixed, "free": free,
           "trace_rel_tol": cfg.trace_rel_tol, "ft": {"lr": cfg.ft_lr, "batch_size": cfg.batch_size},
           "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "note": a.note,
           "others": busy_processes(),
           "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} "
                      f"logical cores, torch {torch.__version__} with {torch.get_num_threads()} threads"}
    rows, meas = [], {}
    for seed in a.seeds:
        m = meas[seed] = measures(fp32, task, cfg, data, seed, free, a, progress)
        table = sensitivity_table(fp32, {k: max(v, 0.0) for k, v in m["traces"].items()}, bits=cfg.w_bits,
                                  fixed=fixed, example_input=example, progress=False, weight_range=cfg.weight_range)
        control = ev.tune(copy.deepcopy(fp32), seed)  # the same fine-tuning on the float model
        rows.append(row(seed, None, None, "fp32", None, ref, control))
        hawq: dict = {}
        for bits, name in tqdm([(b, n) for b in a.budgets for n in a.allocators], desc=f"seed {seed}",
                               disable=not progress):
            budget = acc.uniform_size_bytes(table, bits)
            plan = acc.allocate(name, {"trace": table}, budget, m, seed)
            before, after = ev(plan, seed)
            rows.append(row(seed, bits, budget, name, plan, before, after))
            if name == "hawq":
                hawq[bits] = (before, after)
        for r in rows:  # paired test-sampling errors against HAWQ-V2 of the same seed and budget
            if r["seed"] == seed and "_ce" in r and r["budget_bits"] in hawq:
                hb, ha = hawq[r["budget_bits"]]
                r["test_se_before"] = paired_test_se(r["_ce"][0], hb["ce"])
                r["test_se_after"] = paired_test_se(r["_ce"][1], ha["ce"])
        run["others"] = list(dict.fromkeys(run["others"] + busy_processes()))
        run.update(rows=[{k: v for k, v in r.items() if k != "_ce"} for r in rows], measures=meas,
                   seeds_done=sorted(meas), ft_s=ev.ft_s, eval_s=ev.eval_s, wall_s=time.perf_counter() - t_start,
                   load=[load_start[0], os.getloadavg()[0]],
                   finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        raw = Path(a.out).with_suffix(".json")  # after every seed: a stopped run leaves the seeds it finished
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text(json.dumps(run, indent=1))
        write_page(json.loads(raw.read_text()), Path(a.out), raw, read_resnet(a.results))


def busy_processes(min_cpu: float = 20.0) -> list[str]:
    """Other processes using at least `min_cpu` % of a core now (what else shared the machine), from ps."""
    try:
        ps = subprocess.run(["ps", "-eo", "pid=,pcpu=,args="], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    out = []
    for line in ps.splitlines():
        pid, cpu, cmd = (line.split(None, 2) + ["", ""])[:3]
        if pid.isdigit() and int(pid) != os.getpid() and float(cpu or 0) >= min_cpu and not cmd.startswith("ps "):
            out.append(cmd[:100])
    return out


def row(seed: int, bits, budget, name: str, plan, before: dict, after: dict) -> dict:
    r = {"seed": seed, "budget_bits": bits, "budget_bytes": budget, "allocator": name,
         "size_bytes": None if plan is None else plan.size_bytes, "omega": None if plan is None else plan.omega,
         "w_bits": None if plan is None else plan.w_bits, "before": before["ppl"], "after": after["ppl"],
         "top1_before": before["top1"], "top1_after": after["top1"]}
    if plan is not None:
        r["_ce"] = (before["ce"], after["ce"])
    return r


def read_resnet(path: str) -> dict | None:
    p = Path(path)
    return json.loads(p.read_text()) if p.exists() else None


# --------------------------------------------------------------------------------------------- the page
PHASES = (("before", "before FT"), ("after", "after FT"))


def _sel(rows: list[dict], budget, name: str) -> list[dict]:
    return sorted((r for r in rows if r["budget_bits"] == budget and r["allocator"] == name), key=lambda r: r["seed"])


def compare(rows: list[dict], budget: float, name: str, phase: str) -> dict | None:
    """`name` against HAWQ-V2 at `budget`, paired by seed: differences, verdict, test error; None without pairs."""
    ref = {r["seed"]: r for r in _sel(rows, budget, "hawq")}
    rs = [r for r in _sel(rows, budget, name) if r["seed"] in ref]
    if name == "hawq" or not rs:
        return None
    same = all(r["w_bits"] == ref[r["seed"]]["w_bits"] for r in rs)
    d = [r[phase] - ref[r["seed"]][phase] for r in rs]
    test_se = float(np.mean([r.get(f"test_se_{phase}", 0.0) for r in rs]))
    m, s = acc.mean_se(d)
    return {"d": d, "mean": m, "se": s, "test_se": test_se, "same": same,
            "verdict": "same" if same else verdict(d, test_se), "n": len(rs)}


def _pmv(xs, digits: int = 3) -> str:
    return acc.pm(xs, digits)


def _delta(c: dict | None) -> str:
    if c is None:
        return "—"
    if c["same"]:
        return "same plans"
    mark = {"ahead": " (HAWQ-V2 sig. lower)", "behind": " (sig. lower than HAWQ-V2)", "close": ""}[c["verdict"]]
    s = "" if np.isnan(c["se"]) else f" ± {c['se']:.3f}"
    return f"{c['mean']:+.3f}{s}{mark}"


def budget_tables(run: dict, allocs: list[str]) -> list[str]:
    rows, L = run["rows"], []
    fp = sorted((r for r in rows if r["allocator"] == "fp32"), key=lambda r: r["seed"])
    for budget in sorted({r["budget_bits"] for r in rows if r["budget_bits"] is not None}, reverse=True):
        sub = [r for r in rows if r["budget_bits"] == budget]
        L += [f"### Budget: size of uniform {budget:g}-bit weights ({sub[0]['budget_bytes'] / 1024:.1f} KiB)", "",
              "| model | size KiB | total Omega | bits per free layer (first seed) | ppl before FT | ppl after FT "
              "| Δ ppl before vs HAWQ-V2 | Δ ppl after vs HAWQ-V2 |", "|---|---|---|---|---|---|---|---|"]
        if fp:
            L.append(f"| full precision | {run['fp32_size_bytes'] / 1024:.1f} | — | 32 "
                     f"| {_pmv([r['before'] for r in fp])} "
                     f"| {_pmv([r['after'] for r in fp])} (same fine-tuning) | — | — |")
        for name in allocs:
            rs = _sel(rows, budget, name)
            if not rs:
                continue
            bits = " ".join(str(b) for f, b in rs[0]["w_bits"].items() if f in run["free"])
            cells = [NAMES[name], _pmv([r["size_bytes"] / 1024 for r in rs], 1), _pmv([r["omega"] for r in rs], 4),
                     bits, _pmv([r["before"] for r in rs]), _pmv([r["after"] for r in rs]),
                     *(_delta(compare(rows, budget, name, ph)) for ph, _ in PHASES)]
            L.append("| " + " | ".join(cells) + " |")
        L.append("")
    return L


def uniform_lines(run: dict) -> list[str]:
    """The plain answer per budget and phase: does HAWQ-V2 beat uniform significantly?"""
    rows, out = run["rows"], []
    for budget in sorted({r["budget_bits"] for r in rows if r["budget_bits"] is not None}, reverse=True):
        parts = []
        for phase, label in PHASES:
            c = compare(rows, budget, "uniform", phase)
            if c is None:
                continue
            h = float(np.mean([r[phase] for r in _sel(rows, budget, "hawq")]))
            u = float(np.mean([r[phase] for r in _sel(rows, budget, "uniform")]))
            margin = (f"Δ = {c['mean']:+.3f}" + ("" if np.isnan(c["se"]) else f" ± {c['se']:.3f}")
                      + f" over {c['n']} seed{'s' if c['n'] > 1 else ''}, test-sampling error {c['test_se']:.3f}")
            word = {"ahead": "**yes**, significantly lower perplexity than uniform",
                    "behind": "**no**: uniform is significantly lower",
                    "close": "**not significantly**"
                    + (" (HAWQ-V2 lower)" if c["mean"] > 0 else " (uniform lower or equal)"),
                    "same": "the same plan as uniform"}[c["verdict"]]
            parts.append(f"{label}: {word}, {h:.3f} against {u:.3f} ({margin})")
        out.append(f"- Uniform-{budget:g}-bit budget: " + "; ".join(parts) + ".")
    return out


def baseline_lines(run: dict, allocs: list[str]) -> list[str]:
    rows, out = run["rows"], []
    for phase, label in PHASES:
        tally: dict = {}
        for budget in sorted({r["budget_bits"] for r in rows if r["budget_bits"] is not None}, reverse=True):
            for name in allocs:
                c = compare(rows, budget, name, phase)
                if c is not None and name != "uniform":
                    tally.setdefault(c["verdict"], []).append(f"{NAMES[name]} at {budget:g} bits")
        n = sum(len(v) for v in tally.values())
        if n:
            behind = "; ".join(tally.get("behind", []))
            out.append(f"- Other baselines, {label}: of {n} comparisons HAWQ-V2 is significantly lower in "
                       f"{len(tally.get('ahead', []))}, not significantly different in {len(tally.get('close', []))}, "
                       f"significantly higher in {len(tally.get('behind', []))}" + (f" ({behind})" if behind else "")
                       + f", and {len(tally.get('same', []))} chose HAWQ-V2's own plans.")
    return out


BAD = ("random", "reversed")  # the poor allocations of the second measure: the worse of the two


def _word(more: list[str], less: list[str]) -> str:
    return ("**more** for the LM" if more and not less else "**less** for the LM" if less and not more
            else "**more** for the LM at some points and **less** at others" if more else "**not comparably**")


def damage(run: dict, resnet: dict | None) -> tuple[list[str], list[str]]:
    """Does allocation matter more for the LM than for ResNet-20? Two measures per budget and phase: (table,
    verdict lines).

    1. the share of uniform's quantization damage that HAWQ-V2 avoids, 1 − damage_HAWQ / damage_uniform;
    2. the damage of a poor allocation (the worse of random and reversed, same budget) over HAWQ-V2's.
    LM damage = ln(ppl / reference ppl), the extra cross-entropy in nats per byte; the reference is the
    full-precision model before FT and the same fine-tuning of it after. ResNet-20 damage = top-1 drop from fp32.
    A measure counts where its denominator's damage is clear: ≥ 0.5 points (ResNet-20), ≥ 0.01 nats (LM)."""
    rows = run["rows"]
    fp = {r["seed"]: r for r in rows if r["allocator"] == "fp32"}
    rn_rows = [r for r in (resnet or {}).get("rows", []) if r.get("a_bits") is None]
    T = ["| budget | phase | LM: uniform / HAWQ-V2 / worse of random, reversed: ln(ppl/ref) | LM: share avoided "
         "| LM: poor / HAWQ-V2 | ResNet-20: uniform / HAWQ-V2 / worse of random, reversed: top-1 drop "
         "| ResNet-20: share avoided | ResNet-20: poor / HAWQ-V2 |", "|---|---|---|---|---|---|---|---|"]
    tally = {1: ([], [], []), 2: ([], [], [])}  # measure -> (LM more, LM less or equal, not comparable)
    lm_ratio: dict = {}  # budget -> the LM's poor / HAWQ-V2 damage ratios (both phases)

    def measures_of(dmg: dict, clear: float) -> tuple[float, float]:
        share = 1 - dmg["hawq"] / dmg["uniform"] if dmg.get("uniform", 0) >= clear else math.nan
        poor = max((dmg[n] for n in BAD if n in dmg), default=math.nan)
        ratio = poor / dmg["hawq"] if poor >= clear and dmg["hawq"] > 0 else math.nan
        return share, ratio

    def cells(dmg: dict, digits: int) -> str:
        poor = max((dmg[n] for n in BAD if n in dmg), default=math.nan)
        return " / ".join("—" if math.isnan(x) else f"{x:.{digits}f}"
                          for x in (dmg.get("uniform", math.nan), dmg["hawq"], poor))

    fmt = {1: lambda x: "—" if math.isnan(x) else f"{100 * x:.0f}%", 2: lambda x: "—" if math.isnan(x) else f"{x:.1f}×"}
    for budget in sorted({r["budget_bits"] for r in rows if r["budget_bits"] is not None}, reverse=True):
        for phase, label in PHASES:
            lm = {n: float(np.mean([math.log(r[phase] / (fp[r["seed"]][phase] if phase == "after" else
                                                          run["fp32_ppl"])) for r in _sel(rows, budget, n)]))
                  for n in ("uniform", "hawq", *BAD) if _sel(rows, budget, n)}
            if "hawq" not in lm:
                continue
            lm_m = measures_of(lm, 0.01)
            lm_ratio[budget] = lm_ratio.get(budget, []) + ([] if math.isnan(lm_m[1]) else [lm_m[1]])
            rn = {n: resnet["fp32_top1"] - float(np.mean(v)) for n in ("uniform", "hawq", *BAD)
                  if (v := [r[phase] for r in rn_rows if r["budget_bits"] == budget and r["allocator"] == n])}
            rn_m = measures_of(rn, 0.5) if "hawq" in rn else (math.nan, math.nan)
            where = f"{budget:g} bits {label}"
            for k in (1, 2):
                x, y = lm_m[k - 1], rn_m[k - 1]
                tally[k][2 if math.isnan(x) or math.isnan(y) else 0 if x > y else 1].append(where)
            T.append(f"| {budget:g} | {label} | {cells(lm, 4)} | {fmt[1](lm_m[0])} | {fmt[2](lm_m[1])} | "
                     + (f"{cells(rn, 2)} | {fmt[1](rn_m[0])} | {fmt[2](rn_m[1])} |" if "hawq" in rn else "— | — | — |"))
    if resnet is None:
        return T, ["- No ResNet-20 records (docs/results.json) to compare with."]
    same = [f"{b:g}" for b in sorted({r["budget_bits"] for r in rows if r["budget_bits"] is not None}, reverse=True)
            if (c := compare(rows, b, "uniform", "before")) is not None and c["same"]]
    seeds = resnet.get("settings", {}).get("seeds", [])
    V = []
    for k, what in ((1, "HAWQ-V2 avoids a larger share of uniform's damage"),
                    (2, "a poor allocation costs a larger multiple of HAWQ-V2's damage")):
        more, less, skipped = tally[k]
        V.append(f"- Measure {k}: {what} on the LM at {len(more)} of {len(more) + len(less)} comparable "
                 f"budget/phase points ({', '.join(more) or 'none'}), not at {len(less)} ({', '.join(less) or 'none'})"
                 + (f"; not comparable (a damage below the threshold) at {len(skipped)}" if skipped else "")
                 + f": by this measure allocation matters {_word(more, less)}.")
    w1, w2 = _word(*tally[1][:2]), _word(*tally[2][:2])
    V.append("- In one line: " + (f"allocation matters {w1} than for ResNet-20 by both measures" if w1 == w2 else
                                  f"against uniform, allocation matters {w1}; against poor non-uniform plans of the "
                                  f"same size, it matters {w2}")
             + (f". HAWQ-V2 chose the uniform plan itself at {', '.join(same)} bits on every seed "
                f"({len(run['free'])} free layers, widths {'/'.join(str(b) for b in (2, 3, 4, 8))}), so there it "
                "gains nothing over uniform"
                + (f", while a poor non-uniform plan of the same size does {min(rs):.1f}-{max(rs):.1f}× its damage"
                   if (rs := [x for b in same for x in lm_ratio.get(float(b), [])]) else "")
                if same else "")
             + f". ResNet-20's figures are docs/results.json's ({len(seeds)} seed{'s' if len(seeds) != 1 else ''}, "
             f"top-1 on {resnet.get('test_images')} test images; top-1 differences under ~0.6 points there are within "
             "its test-sampling error, so its ratios are rough); at 2.5 bits uniform is 2-bit on both, spending less "
             "than the budget.")
    return T, V


def _pct(rel_se: float | None) -> str:
    return "∞ (one sample)" if rel_se is None else f"{100 * rel_se:.1f}%"


def trace_lines(run: dict) -> list[str]:
    L = ["| seed | method | sequences | largest relative SE (layers ≥ 1% of the total trace) | layer | converged "
         "| trace wall s | Fisher wall s |", "|---|---|---|---|---|---|---|---|"]
    for s, m in sorted(run["measures"].items(), key=lambda kv: int(kv[0])):
        big = [lt for lt in m["layers"] if lt["share"] >= 0.01]  # None: one sample of the residual only
        worst = max(big, key=lambda lt: math.inf if lt["rel_se"] is None else lt["rel_se"]) if big else None
        cached = " (cached)" if m.get("cached") else ""
        L.append(f"| {s} | {m['method']} | {m['n_images']} | "
                 + (f"{_pct(worst['rel_se'])} | {worst['fqn']}" if worst else "— | —")
                 + f" | {m['converged']} | {m['wall_s']['traces']:.0f}{cached} | {m['wall_s']['fisher']:.0f}{cached} |")
    first = min(run["measures"], key=int)
    L += ["", f"Per layer, seed {first} (share = n·trace / Σ n·trace; fixed layers at 8 bits: "
          f"{', '.join(run['fixed'])}):", "", "| layer | n params | average trace | share | relative SE |",
          "|---|---|---|---|---|"]
    for lt in run["measures"][first]["layers"]:
        L.append(f"| {lt['fqn']} | {lt['n_params']} | {lt['trace']:.4g} | {100 * lt['share']:.1f}% "
                 f"| {_pct(lt['rel_se'])} |")
    notes = run["measures"][first].get("notes") or []
    return L + ([""] + [f"- Estimator note: {n}" for n in notes] if notes else [])


def write_page(run: dict, out: Path, raw: Path, resnet: dict | None = None) -> None:
    a = argparse.Namespace(**run["settings"])
    allocs = [n for n in ("uniform", "random", "reversed", "fisher", "monotone", "hawq") if n in a.allocators]
    reduced = {k: getattr(a, k) for k in FULL if getattr(a, k) != FULL[k]}
    done = [int(s) for s in run.get("seeds_done", a.seeds)]
    wall, ft_s, eval_s = run["wall_s"], run["ft_s"], run["eval_s"]
    tr = run.get("fp32_train", {})
    L = ["# Language model: HAWQ-V2 against uniform and baseline allocators (perplexity)", "",
         f"Generated by `.venv/bin/python {' '.join(shlex.quote(x) for x in run['argv'])}`, started "
         f"{run['started']}, last written {run['finished']}; every number on this page comes from that run (its raw "
         f"records: [{raw.name}]({raw.name})).", ""]
    if run.get("rendered"):
        L += [f"Page rendered again from those raw records on {run['rendered']} (`--render`).", ""]
    if done != list(a.seeds):
        L += [f"**PARTIAL**: seeds {done} of {a.seeds} finished when this page was written.", ""]
    if reduced:
        L += ["**This is a REDUCED run**, not the full design; settings that differ from the full defaults: "
              + ", ".join(f"`{k}={v}` (full: `{FULL[k]}`)" for k, v in reduced.items()) + ".", ""]
    crit = float(stats.t.ppf(0.975, len(done) - 1)) if len(done) > 1 else 0.0
    L += ["## Task and settings", "",
          f"- `hawq.tasks.lm`: `char_gpt` ({run['n_params']:,} parameters: 2 blocks, width 96, 4 heads, context 64, "
          f"byte vocabulary) on the bytes of the standard library's own source files ({run['data_source']}, "
          f"{run['n_train_bytes'] / 2**20:.1f} MiB of training text; files split by a hash of their path, 1 in 20 "
          "to validation).",
          f"- Full-precision model: the task's default training ({tr.get('n_sequences', 'the default number of')} "
          f"sequences of 64 bytes, AdamW lr {tr.get('lr', 3e-3)} cosine, batch {tr.get('batch_size', 64)}), from "
          f"{run['source']} ({run['fp32_s']:.0f} s here); validation perplexity {run['fp32_ppl']:.3f} (next-byte "
          f"top-1 {run['fp32_top1']:.1f}%) on the first {run['n_val']} validation windows (65 bytes each, the same "
          "for every model: perplexity = exp(mean next-byte cross-entropy), the task's metric).",
          "- Weights only quantized (per-channel symmetric, the 4 Linear layers of each block, `qkv`, `proj`, `fc1`, "
          f"`fc2`); fixed at 8 bits: {', '.join(run['fixed'])} (the first and the last layer); embeddings and "
          "LayerNorms stay in float; candidate widths {2, 3, 4, 8}. Budget = size of uniform b-bit weights "
          "(fractional b: n·b bits per free layer).",
          "- Post-training steps (`hawq.train.post_train_`, `PostTrainConfig()` through "
          "`hawq.pipeline.quantized_copy`) "
          "before the \"before FT\" score and before fine-tuning: per-channel weight clipping at the error-minimising "
          "ratio, and bias correction (a LayerNorm model, no batch norm) on the task's calibration windows.",
          f"- Fine-tuning, identical for every plan and for the full-precision model (the control row): the task's "
          f"own `LanguageModelTask.finetune` (what `hawq run --task lm` runs), {a.ft_sequences} random training "
          f"windows, AdamW lr {run['ft']['lr']} cosine, batch {run['ft']['batch_size']}, weight decay 0.01, "
          "gradient clipping 1.0, straight-through estimator; the order of windows is the seed's.",
          f"- Seeds {a.seeds}: a seed sets the training sequences of the traces and the Fisher, the random plan and "
          "the fine-tuning order.",
          f"- Traces: `gn_residual` (exact Gauss-Newton part per sequence plus Hutchinson probes of the residual "
          f"H − G; this net is curved: LayerNorm, GELU, softmax attention) by sequence cross-entropy, one 64-byte "
          f"sequence one sample, stopping at {100 * run['trace_rel_tol']:.0f}% relative standard error on every "
          f"layer with ≥ 1% of the total trace or at {a.trace_sequences} sequences. Negative averages would count "
          f"as 0 (as `hawq run` does). Empirical Fisher: mean squared per-sequence gradient (true next bytes) on "
          f"{a.fisher_sequences} sequences of the same stream.",
          "- Allocators: uniform = the largest single width that fits (at 2.5 bits that is 2 bits, so it spends "
          "less than the budget); random = log-uniform random per-layer scores through the same exact knapsack; "
          "reversed = 1/trace as the score; empirical Fisher = Fisher × ||Q(W)−W||²; monotone = widths "
          "non-increasing in trace order; HAWQ-V2 = trace × ||Q(W)−W||² (exact knapsack). Total Omega is "
          "HAWQ-V2's Omega of each plan, whichever allocator chose it.",
          f"- Mean ± standard error over seeds; Δ = allocator − HAWQ-V2 perplexity per seed (paired; positive: "
          f"HAWQ-V2 lower, i.e. better). Significant (\"sig.\"), as in docs/results.md: |mean Δ| above both the "
          f"95% Student-t interval over seeds ({crit:.2f} standard errors for {len(done)} seed"
          f"{'s' if len(done) != 1 else ''}) and twice the test-sampling error of the paired difference on the same "
          f"windows. That error is measured, not a worst case: the per-window cross-entropy differences of the two "
          f"models, averaged in blocks of {BLOCK} neighbouring windows (which share files), by the delta method "
          "at the two perplexities; the mean over seeds (the seeds share the windows).", ""]
    T, V = damage(run, resnet)
    L += ["## Summary", "", "Does HAWQ-V2 beat uniform (the same size budget, lower perplexity)?", "",
          *uniform_lines(run), *baseline_lines(run, allocs), "",
          "### Does allocation matter more here than for ResNet-20?", "",
          "Two measures per budget: (1) the share of uniform's quantization damage that HAWQ-V2's allocation avoids, "
          "1 − damage_HAWQ / damage_uniform; (2) how many times HAWQ-V2's damage a poor allocation of the same budget "
          "does (the worse of random and reversed). Damage = ln(ppl / reference) for the LM (extra nats per byte; "
          "reference: the full-precision model, after FT the same fine-tuning of it) and the top-1 drop from full "
          "precision for ResNet-20 (docs/results.md, weights only); means over seeds. A measure is shown where its "
          "denominator's damage is clear (≥ 0.01 nats, ≥ 0.5 points):", "", *T, "", *V, "",
          "## Tables", "", *budget_tables(run, allocs),
          "## Trace precision and time", "", *trace_lines(run), ""]
    busy = run["load"][0] > 1.5 or run["load"][1] > 1.5
    L += ["## Machine and cost", "",
          f"- {run['machine']}; started {run['started']}, last written {run['finished']}; load average (1 min) at "
          f"start {run['load'][0]:.1f}, at the last write {run['load'][1]:.1f}"
          + (": more than this run's one thread accounts for, so other work shared the machine and the wall "
             "times are inflated." if busy else ".") + (f" {run['note']}" if run.get("note") else ""),
          "- Other processes above 20% of a core at the start and at each seed's end (`ps`): "
          + ("; ".join(f"`{c}`" for c in run.get("others", [])) or "none") + ".",
          f"- Total wall time {wall / 60:.1f} min (full-precision model {run['fp32_s']:.0f} s). Fine-tuning runs: "
          f"{len(ft_s)}, median {np.median(ft_s) if ft_s else 0:.1f} s; evaluations: {len(eval_s)}, median "
          f"{np.median(eval_s) if eval_s else 0:.1f} s (identical plan and seed pairs are measured once; a plan's "
          "before-FT score does not depend on the seed).", ""]
    acc.write_lines(out, L + acc.raw_rows(run["rows"]), wall)


if __name__ == "__main__":
    args = parse()
    if args.render:
        recorded = json.loads(Path(args.render).read_text())
        recorded["rendered"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        write_page(recorded, Path(args.out), Path(args.render), read_resnet(args.results))
    else:
        main(args)
