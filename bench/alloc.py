"""Exact allocation on a ResNet-50-sized problem: 54 layers x 4 bit widths, solved by DP and by ILP.

Layer sizes and per-image MACs are ResNet-50's (torchvision, built on the meta device: no weights);
traces are log-uniform random, perturbations ~ n * 4^-b with noise. Prints the median wall time of the
Pareto frontier and of the best plan under a budget, the frontier size, the ILP time for the same budget,
and checks that both solvers reach the same Omega.

    .venv/bin/python bench/alloc.py [--repeats 5] [--seed 0] [--budget-frac 0.5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torchvision

from hawq.alloc import (
    MB,
    LayerSensitivity,
    SensitivityTable,
    best_joint_plan,
    best_plan,
    layer_macs,
    model_size_bytes,
    pareto_frontier,
)
from hawq.alloc.ilp import solve_ilp
from hawq.alloc.options import build_groups, decode, other_bits
from hawq.alloc.plan import make_plan

BITS = (2, 3, 4, 8)


def resnet50_table(seed: int) -> SensitivityTable:
    with torch.device("meta"):
        model = torchvision.models.resnet50()
        macs = layer_macs(model, torch.empty(1, 3, 224, 224))
    rng = np.random.default_rng(seed)
    layers = []
    names = list(macs)
    for i, name in enumerate(names):
        n = model.get_submodule(name).weight.numel()
        trace = float(10 ** rng.uniform(-3, 1))
        opts = (8,) if i in (0, len(names) - 1) else BITS
        scale = float(10 ** rng.uniform(-4, -2))
        pert = {b: n * scale * 4.0**-b * float(rng.uniform(0.8, 1.2)) for b in opts}
        omega = {b: trace * p for b, p in pert.items()}
        layers.append(LayerSensitivity(name, n, trace, opts, pert, omega, macs[name]))
    other = sum(p.numel() for p in model.parameters()) - sum(r.n_params for r in layers)
    return SensitivityTable(tuple(layers), other, BITS)


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-frac", type=float, default=0.5, help="0 = 2-bit size, 1 = 8-bit size")
    args = ap.parse_args()

    table = resnet50_table(args.seed)
    lo, hi = model_size_bytes(table, 2), model_size_bytes(table, 8)
    budget = lo + args.budget_frac * (hi - lo)
    print(
        f"problem: {len(table.layers)} layers x {len(BITS)} bit widths (first/last fixed at 8), "
        f"n_params {min(r.n_params for r in table.layers):,}..{max(r.n_params for r in table.layers):,}"
    )
    print(f"budget: {budget / MB:.3f} MB (2-bit {lo / MB:.3f} MB, 8-bit {hi / MB:.3f} MB)")

    t_front, front = median_time(lambda: pareto_frontier(table), args.repeats)
    t_best, plan = median_time(lambda: best_plan(table, budget), args.repeats)
    print(f"pareto_frontier: {t_front * 1e3:.1f} ms (median of {args.repeats}), {len(front):,} points")
    print(f"best_plan:       {t_best * 1e3:.1f} ms, {plan.size_bytes / MB:.3f} MB, omega {plan.omega:.6g}")
    print(f"frontier + best plan: {(t_front + t_best) * 1e3:.1f} ms")

    groups = build_groups(table)
    cap = int(budget * 8) - other_bits(table)
    t_ilp, choice = median_time(lambda: solve_ilp(groups, size_cap=cap), max(1, args.repeats // 2))
    w, _ = decode(table, groups, choice)
    ilp_plan = make_plan(table, w)
    rel = abs(ilp_plan.omega - plan.omega) / abs(plan.omega)
    print(
        f"ILP (HiGHS):  {t_ilp * 1e3:.1f} ms, {ilp_plan.size_bytes / MB:.3f} MB, Omega {ilp_plan.omega:.6g}"
    )
    print(f"DP vs ILP omega: relative difference {rel:.2e} -> {'SAME' if rel < 1e-9 else 'DIFFERENT'}")
    best_on_front = min(p.omega for p in front if p.size_bytes <= budget)
    same = "same" if best_on_front == plan.omega else "DIFFERS"
    print(f"best frontier point within budget: omega {best_on_front:.6g} ({same} as best_plan)")
    if rel >= 1e-9 or same != "same":
        raise SystemExit("DP and ILP disagree")

    rng = np.random.default_rng(args.seed + 1)
    act = {r.fqn: {4: float(rng.uniform(0.1, 1)) * r.omega[r.bits[0]], 8: 0.0} for r in table.layers}
    bops_cap = 0.5 * sum(r.macs * 8 * 8 for r in table.layers)
    t_j, jp = median_time(lambda: best_joint_plan(table, act, budget_bytes=budget, budget_bops=bops_cap), 1)
    t_jd, jd = median_time(lambda: best_joint_plan(table, act, budget_bops=bops_cap, method="dp"), 1)
    t_ji, ji = median_time(lambda: best_joint_plan(table, act, budget_bops=bops_cap, method="ilp"), 1)
    print(
        f"joint (w,a) size+BOPs budgets, ILP: {t_j * 1e3:.1f} ms, omega {jp.omega:.6g}, "
        f"{jp.bops / 1e9:.2f} GBOPs <= {bops_cap / 1e9:.2f}"
    )
    print(
        f"joint BOPs budget only: DP {t_jd * 1e3:.1f} ms omega {jd.omega:.6g}; ILP {t_ji * 1e3:.1f} ms "
        f"omega {ji.omega:.6g}"
    )


if __name__ == "__main__":
    main()
