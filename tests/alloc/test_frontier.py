"""The Pareto DP and best_plan equal brute force over every plan."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hawq
from hawq.alloc import (
    best_plan,
    model_size_bytes,
    pareto_dp,
    pareto_frontier,
    plan_for_bits,
    plan_from_point,
    sensitivity_table,
    weight_frontier,
)


def _check_frontier(table, front, brute) -> None:
    plans = brute.plans(table)
    ref = brute.frontier(plans)
    assert [p.size_bytes * 8 for p in front] == [c for c, _ in ref]
    np.testing.assert_allclose([p.omega for p in front], [o for _, o in ref], rtol=1e-12, atol=0)
    sizes = [p.size_bytes for p in front]
    omegas = [p.omega for p in front]
    assert all(a < b for a, b in zip(sizes, sizes[1:]))
    assert all(a > b for a, b in zip(omegas, omegas[1:]))
    for p in front:  # each point's bits reproduce its size and Omega
        plan = plan_from_point(table, p)
        assert plan.size_bytes == p.size_bytes
        assert math.isclose(plan.omega, p.omega, rel_tol=1e-12, abs_tol=1e-12)


def _check_budgets(table, brute) -> None:
    plans = brute.plans(table)
    sizes = sorted({p[0] for p in plans})
    budgets = set(sizes) | {s + 3 for s in sizes} | {s - 1 for s in sizes if s - 1 >= sizes[0]}
    for bits in sorted(budgets):
        plan = best_plan(table, bits / 8)
        ref = brute.best(plans, size_cap=bits)
        assert plan.size_bytes * 8 <= bits
        assert math.isclose(plan.omega, ref, rel_tol=1e-12, abs_tol=1e-12), bits
    with pytest.raises(ValueError, match="raise --budget-mb"):
        best_plan(table, (sizes[0] - 1) / 8)


@pytest.mark.parametrize("seed", range(8))
def test_frontier_and_best_plan_equal_brute_force(seed, table_factory, brute):
    table = table_factory(seed, n_layers=6, bits=(2, 4, 8) if seed % 2 else (2, 3, 4, 8))
    _check_frontier(table, pareto_frontier(table), brute)
    _check_budgets(table, brute)


@pytest.mark.parametrize("seed", range(6))
def test_exact_ties_in_size_and_omega(seed, table_factory, brute):
    """Integer Omegas and tiny sizes: many plans share size and Omega exactly."""
    table = table_factory(seed, n_layers=6, bits=(2, 3, 4), int_omega=True)
    front = pareto_frontier(table)
    ref = brute.frontier(brute.plans(table))
    assert [(p.size_bytes * 8, p.omega) for p in front] == ref
    _check_budgets(table, brute)


def test_fixed_layers_keep_their_bits(table_factory, brute):
    table = table_factory(3, n_layers=6, fixed={0: 8, 5: 4})
    front = pareto_frontier(table)
    _check_frontier(table, front, brute)
    assert all(p.w_bits[0] == 8 and p.w_bits[5] == 4 for p in front)
    for p in front:
        plan = best_plan(table, p.size_bytes)
        assert plan.w_bits["layer0"] == 8 and plan.w_bits["layer5"] == 4
    assert len(front) > 3


def test_tiny_cnn_table_equals_brute_force(brute):
    torch.manual_seed(0)
    model = hawq.create_model("tiny_cnn")
    names = hawq.quantizable_layers(model)
    traces = {n: float(t) for n, t in zip(names, (0.5, 3.0, 0.2))}
    for fixed in ({}, None):
        table = sensitivity_table(model, traces, bits=(2, 3, 4, 8), fixed=fixed)
        _check_frontier(table, pareto_frontier(table), brute)
        _check_budgets(table, brute)


def test_frontier_ends_are_uniform_plans(table_factory):
    table = table_factory(1, n_layers=5, fixed={0: 8})
    front = pareto_frontier(table)
    assert front[0].size_bytes == model_size_bytes(table, 2)
    assert front[-1].size_bytes == model_size_bytes(table, 8)
    assert front[-1].omega == pytest.approx(plan_for_bits(table, 8).omega, rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_capped_dp_equals_uncapped_prefix(seed):
    rng = np.random.default_rng(seed)
    costs = [rng.integers(0, 50, size=3) for _ in range(7)]
    omegas = [rng.uniform(0, 1, size=3) for _ in range(7)]
    full = pareto_dp(costs, omegas)
    for cap in range(int(full.cost[0]), int(full.cost[-1]) + 2, 7):
        capped = pareto_dp(costs, omegas, cap=cap)
        keep = full.cost <= cap
        np.testing.assert_array_equal(capped.cost, full.cost[keep])
        np.testing.assert_allclose(capped.omega, full.omega[keep], rtol=1e-12)
    assert pareto_dp(costs, omegas, cap=int(full.cost[0]) - 1).cost.size == 0


@pytest.mark.parametrize("seed", range(3))
def test_weight_frontier_with_ties_and_bops(seed, table_factory, brute):
    table = table_factory(seed, n_layers=6, bits=(2, 4, 8))
    ties = [("layer1", "layer3"), ("layer3", "layer4")]  # chained: 1, 3 and 4 share bits
    plans = brute.plans(table, ties=ties)
    for cost, col in (("size", 0), ("bops", 1)):
        front = weight_frontier(table, ties=ties, cost=cost)
        got = [(p.size_bytes * 8 if col == 0 else p.bops, p.omega) for p in front]
        ref = brute.frontier(plans, cost=col)
        assert [c for c, _ in got] == [c for c, _ in ref]
        np.testing.assert_allclose([o for _, o in got], [o for _, o in ref], rtol=1e-12)
        assert all(p.w_bits[1] == p.w_bits[3] == p.w_bits[4] for p in front)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 20), st.integers(0, 6)), min_size=1, max_size=4),
        min_size=1,
        max_size=5,
    )
)
def test_pareto_dp_property(options):
    """Any small problem, ties included: the DP's set equals the brute-force frontier."""
    costs = [np.array([c for c, _ in opts]) for opts in options]
    omegas = [np.array([float(o) for _, o in opts]) for opts in options]
    ps = pareto_dp(costs, omegas)
    totals = sorted(
        (sum(c for c, _ in combo), float(sum(o for _, o in combo))) for combo in itertools.product(*options)
    )
    ref = []
    for c, o in totals:
        if (not ref or o < ref[-1][1]) and not (ref and ref[-1][0] == c):
            ref.append((c, o))
    assert list(zip(ps.cost.tolist(), ps.omega.tolist())) == ref
    for row, c, o in zip(ps.choice, ps.cost, ps.omega):  # back-pointers rebuild each point
        assert sum(costs[g][k] for g, k in enumerate(row)) == c
        assert sum(omegas[g][k] for g, k in enumerate(row)) == o
