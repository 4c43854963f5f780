"""Joint weight and activation bits under a size budget, a BOPs budget, or both (HAWQ-V2, Sec. 3.3).

Each layer picks (w_bits, a_bits) with Omega = Omega_w(w) + Omega_a(a); size depends on w only, BOPs =
MACs * w * a. Tied layers (e.g. a residual downsample and the main-path conv reading the same input) share
one choice. One budget or both: the Pareto dynamic program (exact; `frontier.solve_caps`). The integer
program (HiGHS, exact only to its tolerances) is a cross-check, `method="ilp"`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from hawq.alloc.frontier import FrontierPoint, frontier_points, solve_caps, solve_groups
from hawq.alloc.ilp import solve_ilp
from hawq.alloc.options import build_groups, decode, other_bits
from hawq.alloc.plan import Plan, bops_shortfall, budget_cap, check_budget, make_plan
from hawq.alloc.sensitivity import SensitivityTable
from hawq.alloc.size import MB

METHODS = ("auto", "dp", "ilp")


def _check_macs(table: SensitivityTable) -> None:
    if not any(r.macs > 0 for r in table.layers):
        raise ValueError("the table has no MACs, so BOPs are unknown: build it with example_input=a batch")


def best_joint_plan(
    table: SensitivityTable,
    act_omega: Mapping[str, Mapping[int, float]],
    a_bits: Sequence[int] = (4, 8),
    budget_bytes: float | None = None,
    budget_bops: float | None = None,
    ties: Iterable[Sequence[str]] = (),
    method: str = "auto",
) -> Plan:
    """Min total Omega (weights + activations) with size <= budget_bytes and/or BOPs <= budget_bops.

    `act_omega[fqn][a]` is the activation Omega of layer fqn's input at a bits; fixed layers keep their
    weight bits for activations too. `method`: "auto" or "dp" (the exact dynamic program, for one budget or
    both), or "ilp" (HiGHS's plan, for cross-checking: optimal only to its tolerances, ~1e-7 relative).
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is unknown: use one of {METHODS}")
    if budget_bytes is None and budget_bops is None:
        raise ValueError("give budget_bytes, budget_bops, or both")
    check_budget(budget_bytes, "the size budget", "--budget-mb")
    check_budget(budget_bops, "the BOPs budget", "--budget-gbops")
    if budget_bops is not None:
        _check_macs(table)
    groups = build_groups(table, tuple(a_bits), act_omega, ties)
    size_cap = None if budget_bytes is None else budget_cap(budget_bytes, 8) - other_bits(table)
    bops_cap = None if budget_bops is None else budget_cap(budget_bops)
    min_size = sum(int(g.size_bits.min()) for g in groups)
    min_bops = sum(int(g.bops.min()) for g in groups)
    if size_cap is not None and size_cap < min_size:
        raise ValueError(
            f"budget {budget_bytes / MB:.6g} MB is below the smallest feasible size "
            f"{(min_size + other_bits(table)) / 8 / MB:.6g} MB (every layer at its lowest bit width): "
            "raise --budget-mb"
        )
    if bops_cap is not None and bops_cap < min_bops:
        raise bops_shortfall(budget_bops, min_bops)
    choice = solve_ilp(groups, size_cap, bops_cap) if method == "ilp" else solve_caps(groups, size_cap, bops_cap)
    if choice is None:
        raise ValueError("no plan meets both the size and the BOPs budget: raise --budget-mb or --budget-gbops")
    w, a = decode(table, groups, choice)
    return make_plan(table, w, a, act_omega)


def smallest_bops(table: SensitivityTable, a_bits: Sequence[int | None], joint: bool = True) -> int:
    """BOPs of the cheapest plan: free layers at their lowest weight bits and lowest of `a_bits`; fixed layers
    at their weight bits, with those bits for activations too under joint allocation (`joint`), else the
    lowest of `a_bits`. Needs the table's MACs; a budget below this cannot be met."""
    _check_macs(table)
    act = {r.fqn: {a: 0.0 for a in a_bits if a is not None} for r in table.layers if not r.fixed} if joint else None
    return sum(int(g.bops.min()) for g in build_groups(table, tuple(a_bits), act))


def joint_frontier(
    table: SensitivityTable,
    act_omega: Mapping[str, Mapping[int, float]],
    a_bits: Sequence[int] = (4, 8),
    cost: str = "bops",
    ties: Iterable[Sequence[str]] = (),
) -> list[FrontierPoint]:
    """Non-dominated (cost, Omega) joint plans, cost ("bops" or "size") ascending, Omega strictly falling."""
    if cost == "bops":
        _check_macs(table)
    groups = build_groups(table, tuple(a_bits), act_omega, ties)
    return frontier_points(table, groups, solve_groups(groups, cost), joint=True)


def weight_frontier(
    table: SensitivityTable, ties: Iterable[Sequence[str]] = (), cost: str = "size", a_bits: int | None = None
) -> list[FrontierPoint]:
    """Weight-only frontier against size or BOPs (every input at `a_bits`, None = float), with ties."""
    if cost == "bops":
        _check_macs(table)
    groups = build_groups(table, (a_bits,), None, ties)
    return frontier_points(table, groups, solve_groups(groups, cost), joint=a_bits is not None)
