"""Exact Pareto frontier of (cost, total Omega) by dynamic programming over Pareto sets.

Step 3 of HAWQ-V2: every plan has an integer cost (size in bits, or BOPs) and Omega = sum_i Omega_i(b_i).
Layer by layer, the frontier of the first i layers combined with every option of layer i+1 holds the
frontier of the first i+1 layers (a dominated partial plan stays dominated whatever follows), so merging
and pruning after each layer is exact. The best plan under a budget is then the frontier point with the
largest cost within it (multiple-choice knapsack), and no plan is ever enumerated.
"""

from __future__ import annotations

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
