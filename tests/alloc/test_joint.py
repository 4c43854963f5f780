"""Joint weight/activation allocation and the ILP: equal to brute force, with size, BOPs and ties."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hawq.alloc import best_joint_plan, best_plan, joint_frontier, solve_ilp
from hawq.alloc.options import build_groups, decode, other_bits
from hawq.alloc.plan import make_plan

A_BITS = (4, 8)


def _act_omega(table, seed):
    rng = np.random.default_rng(seed)
    free = [r.fqn for r in table.layers if not r.fixed]
    return {f: {4: float(rng.uniform(0, 2)), 8: float(rng.uniform(0, 0.2))} for f in free}


def _budgets(values, n=9):
    lo, hi = min(values), max(values)
    return sorted({int(v) for v in np.linspace(lo - 1, hi, n)})


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tied", [False, True])
def test_joint_one_budget_equals_brute_force(seed, tied, table_factory, brute):
    table = table_factory(seed, n_layers=5, bits=(2, 4, 8), fixed={0: 8})
    act = _act_omega(table, seed)
    ties = [("layer2", "layer3")] if tied else []
    plans = brute.plans(table, A_BITS, act, ties)
    for kw, col in (("budget_bytes", 0), ("budget_bops", 1)):
        for cap in _budgets([p[col] for p in plans]):
            ref = brute.best(plans, **{("size_cap" if col == 0 else "bops_cap"): cap})
            budget = cap / 8 if col == 0 else cap
            if ref is None:
                with pytest.raises(ValueError, match="raise --budget"):
                    best_joint_plan(table, act, A_BITS, ties=ties, **{kw: budget})
                continue
            for method in ("dp", "ilp"):
                plan = best_joint_plan(table, act, A_BITS, ties=ties, method=method, **{kw: budget})
                assert math.isclose(plan.omega, ref, rel_tol=1e-9, abs_tol=1e-12), (kw, cap, method)
                assert (plan.size_bytes * 8 if col == 0 else plan.bops) <= cap
                assert plan.w_bits["layer0"] == 8 and plan.a_bits["layer0"] == 8
                if tied:
                    assert (plan.w_bits["layer2"], plan.a_bits["layer2"]) == (
                        plan.w_bits["layer3"],
                        plan.a_bits["layer3"],
                    )


@pytest.mark.parametrize("seed", range(4))
def test_joint_both_budgets_equals_brute_force(seed, table_factory, brute):
    table = table_factory(seed + 10, n_layers=5, bits=(2, 3, 8))
    act = _act_omega(table, seed)
    ties = [("layer1", "layer4")] if seed % 2 else []
    plans = brute.plans(table, A_BITS, act, ties)
    sizes, bops = [p[0] for p in plans], [p[1] for p in plans]
    for s in _budgets(sizes, 5)[1:]:
        for b in _budgets(bops, 5)[1:]:
            ref = brute.best(plans, size_cap=s, bops_cap=b)
            if ref is None:
                with pytest.raises(ValueError):
                    best_joint_plan(table, act, A_BITS, budget_bytes=s / 8, budget_bops=b, ties=ties)
                continue
            plan = best_joint_plan(table, act, A_BITS, budget_bytes=s / 8, budget_bops=b, ties=ties)
            assert math.isclose(plan.omega, ref, rel_tol=1e-9, abs_tol=1e-12)
            assert plan.size_bytes * 8 <= s and plan.bops <= b


@pytest.mark.parametrize("seed", range(3))
def test_joint_frontier_equals_brute_force(seed, table_factory, brute):
    table = table_factory(seed, n_layers=5, bits=(2, 4, 8), fixed={4: 8})
    act = _act_omega(table, seed)
    ties = [("layer0", "layer1")]
    plans = brute.plans(table, A_BITS, act, ties)
    for cost, col in (("bops", 1), ("size", 0)):
        front = joint_frontier(table, act, A_BITS, cost=cost, ties=ties)
        ref = brute.frontier(plans, cost=col)
        assert [p.bops if col else p.size_bytes * 8 for p in front] == [c for c, _ in ref]
        np.testing.assert_allclose([p.omega for p in front], [o for _, o in ref], rtol=1e-12)
        assert all(p.a_bits is not None and p.a_bits[4] == 8 for p in front)


@pytest.mark.parametrize("seed", range(10))
def test_ilp_agrees_with_dp_weight_only(seed, table_factory):
    table = table_factory(seed, n_layers=12, bits=(2, 3, 4, 8), fixed={0: 8, 11: 8})
    groups = build_groups(table)
    lo = sum(int(g.size_bits.min()) for g in groups)
    hi = sum(int(g.size_bits.max()) for g in groups)
    for frac in (0.0, 0.2, 0.5, 0.9, 1.0):
        cap = int(lo + frac * (hi - lo))
        dp = best_plan(table, (cap + other_bits(table)) / 8)
        ilp = make_plan(table, decode(table, groups, solve_ilp(groups, size_cap=cap))[0])
        assert math.isclose(dp.omega, ilp.omega, rel_tol=1e-9), frac
    assert solve_ilp(groups, size_cap=lo - 1) is None


def test_joint_input_errors(table_factory):
    table = table_factory(0, n_layers=3)
    act = _act_omega(table, 0)
    with pytest.raises(ValueError, match="budget_bytes, budget_bops"):
        best_joint_plan(table, act)
    with pytest.raises(ValueError, match="positive"):
        best_joint_plan(table, act, budget_bops=-5)
    with pytest.raises(ValueError, match="lacks layer"):
        best_joint_plan(table, {"layer0": {4: 1.0, 8: 0.0}}, budget_bops=1e9)
    with pytest.raises(ValueError, match="lacks 4 bits"):
        best_joint_plan(table, {**act, "layer1": {8: 0.0}}, budget_bops=1e9)
    with pytest.raises(ValueError, match="method"):
        best_joint_plan(table, act, budget_bops=1e9, method="greedy")
    both = best_joint_plan(table, act, budget_bops=1e9, budget_bytes=1e9, method="dp")  # the DP takes both
    assert both.omega == best_joint_plan(table, act, budget_bops=1e9, budget_bytes=1e9).omega
    with pytest.raises(ValueError, match="not in the sensitivity table"):
        best_joint_plan(table, act, budget_bops=1e9, ties=[("layer0", "nope")])
    fixed = table_factory(0, n_layers=3, fixed={0: 8, 1: 4})
    with pytest.raises(ValueError, match="share no bit option"):
        best_joint_plan(fixed, _act_omega(fixed, 0), budget_bops=1e9, ties=[("layer0", "layer1")])
