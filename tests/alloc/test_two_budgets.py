"""Exact allocation under a size and a BOPs budget together, and BOPs budgets with fixed activation bits.

The plan a user gets is the exact optimum (the dynamic program over Pareto sets in size, BOPs and Omega);
the integer program (HiGHS) is only a cross-check: it is optimal to its tolerances only (issue 14, item 5).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from hawq.alloc import LayerSensitivity, SensitivityTable, best_joint_plan, best_plan, smallest_bops
from hawq.alloc.frontier import _dominated_3d, best_two_caps

A_BITS = (4, 8)


def _wide_table(seed: int, n_layers: int = 25) -> tuple[SensitivityTable, dict]:
    """Layers of very different size, MACs and trace (Omega spread over ~10 decades)."""
    rng = np.random.default_rng(seed)
    rows, act = [], {}
    for i in range(n_layers):
        n = int(rng.choice([144, 2304, 4608, 9216, 18432, 36864]))
        macs = n * int(rng.choice([64, 256, 1024]))
        trace = float(10 ** rng.uniform(-4, 3))
        omega = {b: trace * n * 4.0**-b * float(rng.uniform(0.5, 1.5)) for b in (2, 3, 4, 8)}
        pert = {b: 4.0**-b for b in (2, 3, 4, 8)}
        rows.append(LayerSensitivity(f"l{i}", n, trace, (2, 3, 4, 8), pert, omega, macs))
        act[f"l{i}"] = {a: trace * 10 * 4.0**-a * float(rng.uniform(0.5, 1.5)) for a in A_BITS}
    return SensitivityTable(tuple(rows), 100, (2, 3, 4, 8)), act


@pytest.mark.parametrize("seed", range(8))
def test_two_budget_plan_is_the_exact_optimum_on_25_layers(seed):
    """The BOPs budget is given but cannot bind (every plan meets it), so the exact optimum is the one-budget
    DP's plan: the two-budget plan must equal it exactly. The integer program used to give this plan, up to
    3e-7 (relative) worse in Omega and with other bits."""
    table, act = _wide_table(seed)
    frac = (0.15, 0.3, 0.5)[seed % 3]
    lo = sum(r.n_params * 2 for r in table.layers)
    hi = sum(r.n_params * 8 for r in table.layers)
    budget = (32 * table.other_params + lo + frac * (hi - lo)) / 8
    every_plan_fits = sum(r.macs * 8 * 8 for r in table.layers)
    ref = best_joint_plan(table, act, A_BITS, budget_bytes=budget, method="dp")
    plan = best_joint_plan(table, act, A_BITS, budget_bytes=budget, budget_bops=every_plan_fits)
    assert plan.omega == ref.omega and plan.w_bits == ref.w_bits and plan.a_bits == ref.a_bits
    ilp = best_joint_plan(table, act, A_BITS, budget_bytes=budget, budget_bops=every_plan_fits, method="ilp")
    assert math.isclose(ilp.omega, plan.omega, rel_tol=1e-5) and ilp.omega >= plan.omega  # the cross-check


@pytest.mark.parametrize("seed", range(4))
def test_both_budgets_binding_never_worse_than_the_integer_program(seed):
    table, act = _wide_table(100 + seed, n_layers=20)
    size = (32 * table.other_params + sum(r.n_params * 4 for r in table.layers)) / 8
    bops = sum(r.macs * 4 * 4 for r in table.layers) * 1.3
    plan = best_joint_plan(table, act, A_BITS, budget_bytes=size, budget_bops=bops)
    ilp = best_joint_plan(table, act, A_BITS, budget_bytes=size, budget_bops=bops, method="ilp")
    assert plan.size_bytes <= size and plan.bops <= bops
    assert plan.omega <= ilp.omega and math.isclose(plan.omega, ilp.omega, rel_tol=1e-5)


def test_best_two_caps_equals_brute_force():
    rng = np.random.default_rng(0)
    for t in range(150):
        n, k = int(rng.integers(1, 6)), int(rng.integers(1, 5))
        c1 = [rng.integers(0, 20, k) for _ in range(n)]
        c2 = [rng.integers(0, 20, k) for _ in range(n)]
        om = [rng.integers(0, 4, k).astype(float) if t % 2 else rng.uniform(0, 10, k) ** 4 for _ in range(n)]
        cap1, cap2 = int(rng.integers(0, 20 * n)), int(rng.integers(0, 20 * n))
        best = None
        for ch in itertools.product(range(k), repeat=n):
            if sum(c1[g][ch[g]] for g in range(n)) <= cap1 and sum(c2[g][ch[g]] for g in range(n)) <= cap2:
                v = 0.0
                for g in range(n):
                    v = om[g][ch[g]] + v
                best = v if best is None else min(best, v)
        found = best_two_caps(c1, c2, om, cap1, cap2)
        if best is None:
            assert found is None, t
            continue
        choice, value = found
        assert value == best, t
        assert sum(c1[g][choice[g]] for g in range(n)) <= cap1 and sum(c2[g][choice[g]] for g in range(n)) <= cap2


def test_three_way_dominance_mask_equals_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(100):
        m = int(rng.integers(1, 70))
        c1, c2, o = rng.integers(0, 5, m), rng.integers(0, 5, m), rng.integers(0, 4, m).astype(float)
        order = np.lexsort((o, c2, c1))
        c1, c2, o = c1[order], c2[order], o[order]
        ref = [any(c2[j] <= c2[i] and o[j] <= o[i] for j in range(i)) for i in range(m)]
        assert _dominated_3d(c1, c2, o).tolist() == ref


@pytest.mark.parametrize("seed", range(4))
def test_weight_only_plan_honours_a_bops_budget_with_fixed_activation_bits(seed, table_factory, brute):
    """--a-bits B --budget-gbops G: BOPs = MACs * w_bits * B, a second budget of the weight-bit choice."""
    table = table_factory(seed, n_layers=5, bits=(2, 3, 4, 8), fixed={0: 8})
    plans = brute.plans(table, (4,))
    sizes, bops = sorted({p[0] for p in plans}), sorted({p[1] for p in plans})
    for b in bops[:: max(1, len(bops) // 6)]:
        for s in (None, sizes[len(sizes) // 3], sizes[-1]):
            ref = brute.best(plans, size_cap=s, bops_cap=b)
            budget = None if s is None else s / 8
            if ref is None:
                with pytest.raises(ValueError, match="raise --budget"):
                    best_plan(table, budget, a_bits=4, budget_bops=b)
                continue
            plan = best_plan(table, budget, a_bits=4, budget_bops=b)
            assert plan.bops <= b and (s is None or plan.size_bytes * 8 <= s)
            assert math.isclose(plan.omega, ref, rel_tol=1e-12, abs_tol=1e-15)
            assert set(plan.a_bits.values()) == {4}
    with pytest.raises(ValueError, match="below the smallest feasible .* GBOPs"):
        best_plan(table, None, a_bits=4, budget_bops=bops[0] - 1)
    assert smallest_bops(table, (4,), joint=False) == bops[0]
