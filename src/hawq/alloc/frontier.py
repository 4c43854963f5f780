"""Exact Pareto frontier of (cost, total Omega) by dynamic programming over Pareto sets.

Step 3 of HAWQ-V2: every plan has an integer cost (size in bits, or BOPs) and Omega = sum_i Omega_i(b_i).
Layer by layer, the frontier of the first i layers combined with every option of layer i+1 holds the
frontier of the first i+1 layers (a dominated partial plan stays dominated whatever follows), so merging
and pruning after each layer is exact. The best plan under a budget is then the frontier point with the
largest cost within it (multiple-choice knapsack), and no plan is ever enumerated. Under a size and a
BOPs budget together the same DP runs over Pareto sets in (size, BOPs, Omega) (`best_two_caps`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hawq.alloc.options import Group, build_groups, other_bits
from hawq.alloc.sensitivity import SensitivityTable


@dataclass(frozen=True)
class ParetoSet:
    """Frontier of a choice problem: cost ascending, omega strictly descending, one option per group."""

    cost: np.ndarray  # (m,) int64
    omega: np.ndarray  # (m,) float64
    choice: np.ndarray  # (m, n_groups) option index per group


def pareto_dp(costs: Sequence[np.ndarray], omegas: Sequence[np.ndarray], cap: int | None = None) -> ParetoSet:
    """Frontier of sum_g costs[g][k_g] vs. sum_g omegas[g][k_g]; with `cap`, only points of cost <= cap.

    Back-pointers are kept per group as int arrays, and the plans are rebuilt by one vectorised walk.
    """
    n = len(costs)
    mins = np.array([int(np.min(c)) for c in costs] + [0], dtype=np.int64)
    rest = np.cumsum(mins[::-1])[::-1]  # rest[g] = smallest cost of groups g..n-1
    if cap is not None and rest[0] > cap:
        return ParetoSet(np.zeros(0, np.int64), np.zeros(0), np.zeros((0, n), np.int64))
    S = np.zeros(1, np.int64)
    O = np.zeros(1, np.float64)
    parents: list[np.ndarray] = []
    options: list[np.ndarray] = []
    for g in range(n):
        c = np.asarray(costs[g], np.int64)
        o = np.asarray(omegas[g], np.float64)
        m = S.shape[0]
        cs = (c[:, None] + S[None, :]).ravel()  # option-major: k runs, each sorted by cost
        os_ = (o[:, None] + O[None, :]).ravel()
        flat = np.arange(cs.shape[0])
        if cap is not None:
            ok = cs <= cap - rest[g + 1]
            cs, os_, flat = cs[ok], os_[ok], flat[ok]
        order = np.argsort(cs, kind="stable")  # timsort merges the k sorted runs
        cs, os_, flat = cs[order], os_[order], flat[order]
        run_min = np.minimum.accumulate(os_)
        keep = np.ones(cs.shape[0], bool)
        keep[1:] = os_[1:] < run_min[:-1]
        idx = np.flatnonzero(keep)
        # Kept points of equal cost have strictly falling omega: the group's last one is its minimum.
        last = np.ones(idx.shape[0], bool)
        last[:-1] = cs[idx[1:]] != cs[idx[:-1]]
        idx = idx[last]
        S, O, flat = cs[idx], os_[idx], flat[idx]
        options.append((flat // m).astype(np.int16))
        parents.append((flat % m).astype(np.int64))
    choice = np.zeros((S.shape[0], n), np.int64)
    ptr = np.arange(S.shape[0])
    for g in range(n - 1, -1, -1):
        choice[:, g] = options[g][ptr]
        ptr = parents[g][ptr]
    return ParetoSet(S, O, choice)


def _dominated_3d(c1: np.ndarray, c2: np.ndarray, om: np.ndarray) -> np.ndarray:
    """Mask of points weakly dominated by an earlier one, for points sorted lexicographically by (c1, c2, om).

    Point i is dropped iff some j < i has c2[j] <= c2[i] and om[j] <= om[i] (c1[j] <= c1[i] by the order), so
    of identical points the first stays. Divide and conquer, one vectorised pass per level: at block size B,
    each right half of a 2B-block is compared with its left half by sorting the block on c2 (left first on
    ties) and a running minimum of the left points' om.
    """
    m = c1.shape[0]
    dead = np.zeros(m, bool)
    if m < 2:
        return dead
    B = 1
    while B < m:
        width = 2 * B
        nb = -(-m // width)
        pad = nb * width - m
        k2 = np.concatenate([c2, np.full(pad, np.iinfo(np.int64).max // 4, np.int64)]).reshape(nb, width)
        o = np.concatenate([om, np.full(pad, np.inf)]).reshape(nb, width)
        right = np.zeros((nb, width), bool)
        right[:, B:] = True
        key = k2 * 2 + right  # left before right at equal c2
        order = np.argsort(key, axis=1, kind="stable")
        o_s = np.take_along_axis(o, order, axis=1)
        r_s = np.take_along_axis(right, order, axis=1)
        best_left = np.minimum.accumulate(np.where(r_s, np.inf, o_s), axis=1)
        hit = r_s & (best_left <= o_s)
        flat = (order + (np.arange(nb) * width)[:, None])[hit]
        dead[flat[flat < m]] = True
        B = width
    return dead


def _suffix_bounds(costs: Sequence[np.ndarray], omegas: Sequence[np.ndarray]) -> list[ParetoSet]:
    """bounds[g]: the (cost, omega) frontier of groups g..n-1 alone (choices not kept); bounds[n] = {(0, 0)}."""
    S, O = np.zeros(1, np.int64), np.zeros(1, np.float64)
    out = [ParetoSet(S, O, np.zeros((1, 0), np.int64))]
    for g in range(len(costs) - 1, -1, -1):
        cs = (np.asarray(costs[g], np.int64)[:, None] + S[None, :]).ravel()
        os_ = (np.asarray(omegas[g], np.float64)[:, None] + O[None, :]).ravel()
        order = np.lexsort((os_, cs))
        cs, os_ = cs[order], os_[order]
        keep = np.ones(cs.shape[0], bool)
        keep[1:] = os_[1:] < np.minimum.accumulate(os_)[:-1]
        S, O = cs[keep], os_[keep]
        out.append(ParetoSet(S, O, np.zeros((S.shape[0], 0), np.int64)))
    return out[::-1]


def _lower_bound(front: ParetoSet, room: np.ndarray) -> np.ndarray:
    """Smallest omega of the frontier within cost `room` (inf where nothing fits)."""
    i = np.searchsorted(front.cost, room, side="right") - 1
    return np.where(i >= 0, front.omega[np.maximum(i, 0)], np.inf)


def best_two_caps(
    costs1: Sequence[np.ndarray],
    costs2: Sequence[np.ndarray],
    omegas: Sequence[np.ndarray],
    cap1: int,
    cap2: int,
    hint: Sequence[int] | None = None,
) -> tuple[np.ndarray, float] | None:
    """Exact min of sum_g omegas[g][k_g] with sum_g costs1[g][k_g] <= cap1 and sum_g costs2[g][k_g] <= cap2.

    Dynamic programming over Pareto sets in (cost1, cost2, omega): a partial plan weakly dominated in all
    three stays dominated whatever follows (rounding is monotone, so this holds for the float sums too), so
    pruning dominated partial plans after each group is exact. Partial plans that cannot fit the caps, or
    whose omega plus a lower bound on the rest (the better of the two one-cap frontiers of the remaining
    groups) exceeds a known feasible plan's, are dropped as well; `hint` (an option per group, e.g. the
    integer program's plan) is one more such plan: a near-optimal one makes that pruning tight, and the
    result does not depend on it. Returns (option per group, omega) of the minimum, the first by
    (cost1, cost2) among equal omegas, or None if no plan fits.
    """
    n = len(costs1)
    c1s = [np.asarray(c, np.int64) for c in costs1]
    c2s = [np.asarray(c, np.int64) for c in costs2]
    oms = [np.asarray(o, np.float64) for o in omegas]
    b1, b2 = _suffix_bounds(c1s, oms), _suffix_bounds(c2s, oms)
    if b1[0].cost[0] > cap1 or b2[0].cost[0] > cap2:
        return None
    # A feasible plan bounds the optimum from above: the best one-cap plans that happen to fit the other cap.
    upper = np.inf
    for ca, cb, capa, capb in ((c1s, c2s, cap1, cap2), (c2s, c1s, cap2, cap1)):
        ps = pareto_dp(ca, oms, cap=capa)
        other = np.zeros(ps.cost.shape[0], np.int64)
        for g in range(n):
            other += cb[g][ps.choice[:, g]]
        fits = other <= capb
        if fits.any():
            upper = min(upper, float(ps.omega[fits].min()))
    if hint is not None:
        k = [int(v) for v in hint]
        if sum(int(c1s[g][k[g]]) for g in range(n)) <= cap1 and sum(int(c2s[g][k[g]]) for g in range(n)) <= cap2:
            value = 0.0
            for g in range(n):
                value = float(oms[g][k[g]] + value)  # the DP's order of summation
            upper = min(upper, value)
    slack = 1e-9 * abs(upper) if np.isfinite(upper) else 0.0  # the bound's own rounding, generously
    S1, S2 = np.zeros(1, np.int64), np.zeros(1, np.int64)
    O = np.zeros(1, np.float64)
    parents: list[np.ndarray] = []
    options: list[np.ndarray] = []
    for g in range(n):
        m = S1.shape[0]
        s1 = (c1s[g][:, None] + S1[None, :]).ravel()
        s2 = (c2s[g][:, None] + S2[None, :]).ravel()
        om = (oms[g][:, None] + O[None, :]).ravel()
        room1, room2 = cap1 - s1, cap2 - s2
        lb = np.maximum(_lower_bound(b1[g + 1], room1), _lower_bound(b2[g + 1], room2))
        ok = np.isfinite(lb) & (om + lb <= upper + slack)
        flat = np.flatnonzero(ok)
        s1, s2, om = s1[flat], s2[flat], om[flat]
        order = np.lexsort((om, s2, s1))
        s1, s2, om, flat = s1[order], s2[order], om[order], flat[order]
        alive = ~_dominated_3d(s1, s2, om)
        S1, S2, O, flat = s1[alive], s2[alive], om[alive], flat[alive]
        if S1.shape[0] == 0:
            return None
        options.append(flat // m)
        parents.append(flat % m)
    best = int(np.argmin(O))  # states are in (cost1, cost2) order: the first minimum
    choice = np.zeros(n, np.int64)
    ptr = best
    for g in range(n - 1, -1, -1):
        choice[g] = options[g][ptr]
        ptr = parents[g][ptr]
    return choice, float(O[best])


@dataclass(frozen=True)
class FrontierPoint:
    """One non-dominated plan; bit widths in table order (`a_bits` only for joint frontiers)."""

    size_bytes: float
    omega: float
    w_bits: tuple[int, ...]
    bops: float | None = None
    a_bits: tuple[int | None, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "size_bytes": self.size_bytes,
            "omega": self.omega,
            "w_bits": list(self.w_bits),
            "bops": self.bops,
            "a_bits": None if self.a_bits is None else list(self.a_bits),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FrontierPoint:
        a = d.get("a_bits")
        return cls(
            size_bytes=float(d["size_bytes"]),
            omega=float(d["omega"]),
            w_bits=tuple(int(b) for b in d["w_bits"]),
            bops=None if d.get("bops") is None else float(d["bops"]),
            a_bits=None if a is None else tuple(None if b is None else int(b) for b in a),
        )


def solve_groups(groups: Sequence[Group], cost: str, cap: int | None = None) -> ParetoSet:
    """Pareto set of the groups' options against `cost` ("size" or "bops")."""
    if cost not in ("size", "bops"):
        raise ValueError(f"cost {cost!r} is unknown: use 'size' or 'bops'")
    costs = [g.size_bits if cost == "size" else g.bops for g in groups]
    return pareto_dp(costs, [g.omega for g in groups], cap)


def solve_caps(
    groups: Sequence[Group], size_cap: int | None = None, bops_cap: int | None = None
) -> np.ndarray | None:
    """The exact min-Omega option per group with size <= size_cap and/or BOPs <= bops_cap; None if none fits.

    One cap: the Pareto DP. Both: `best_two_caps`, with the integer program's plan (HiGHS, exact only to its
    tolerances) as the starting bound and a cross-check: the plan returned is the DP's, never worse than it.
    """
    if size_cap is None and bops_cap is None:
        raise ValueError("give a size cap, a BOPs cap, or both")
    if size_cap is None or bops_cap is None:
        cost, cap = ("size", size_cap) if size_cap is not None else ("bops", bops_cap)
        ps = solve_groups(groups, cost, cap=cap)
        return ps.choice[-1] if ps.cost.shape[0] else None
    from hawq.alloc.ilp import solve_ilp

    with warnings.catch_warnings():  # only a bound here: a plan not proven optimal still helps
        warnings.simplefilter("ignore", RuntimeWarning)
        hint = solve_ilp(groups, size_cap, bops_cap, time_limit_s=10.0)
    costs1, costs2, omegas = [g.size_bits for g in groups], [g.bops for g in groups], [g.omega for g in groups]
    found = best_two_caps(costs1, costs2, omegas, size_cap, bops_cap, hint=hint)
    if found is None:
        return None
    choice, value = found
    fits = hint is not None and sum(int(g.size_bits[k]) for g, k in zip(groups, hint)) <= size_cap
    if fits and sum(int(g.bops[k]) for g, k in zip(groups, hint)) <= bops_cap:
        hinted = 0.0
        for g, k in zip(groups, hint):
            hinted = float(g.omega[k] + hinted)
        if value > hinted:  # the hint was feasible and bounds the DP: a bug, not a tolerance
            raise RuntimeError(f"exact allocation ({value!r}) is worse than the integer program's ({hinted!r})")
    return choice


def frontier_points(
    table: SensitivityTable, groups: Sequence[Group], ps: ParetoSet, joint: bool = False
) -> list[FrontierPoint]:
    """Turn a Pareto set into FrontierPoints with size, BOPs and per-layer bits in table order."""
    n_layers = len(table.layers)
    w_mat = np.zeros((ps.choice.shape[0], n_layers), np.int64)
    a_mat = np.zeros((ps.choice.shape[0], n_layers), np.int64)
    size = np.full(ps.choice.shape[0], other_bits(table), np.int64)
    bops = np.zeros(ps.choice.shape[0], np.int64)
    for j, g in enumerate(groups):
        k = ps.choice[:, j]
        w = np.array([wa[0] for wa in g.choices], np.int64)[k]
        a = np.array([0 if wa[1] is None else wa[1] for wa in g.choices], np.int64)[k]
        for i in g.members:
            w_mat[:, i], a_mat[:, i] = w, a
        size += g.size_bits[k]
        bops += g.bops[k]
    has_macs = any(r.macs > 0 for r in table.layers)
    w_rows = w_mat.tolist()
    a_rows = a_mat.tolist() if joint else [None] * len(w_rows)
    return [
        FrontierPoint(
            size_bytes=s / 8,
            omega=om,
            w_bits=tuple(wr),
            bops=float(bo) if has_macs else None,
            a_bits=None if ar is None else tuple(None if b == 0 else b for b in ar),
        )
        for s, om, wr, ar, bo in zip(size.tolist(), ps.omega.tolist(), w_rows, a_rows, bops.tolist())
    ]


def pareto_frontier(table: SensitivityTable) -> list[FrontierPoint]:
    """Every non-dominated weight-bit plan: size ascending, Omega strictly descending.

    BOPs of a point (activations in float, 32 bits) are filled in when the table has MACs.
    """
    groups = build_groups(table)
    return frontier_points(table, groups, solve_groups(groups, "size"))
