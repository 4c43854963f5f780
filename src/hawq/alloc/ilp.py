"""The same choice problem as an integer program (scipy.optimize.milp, HiGHS): an independent exact solver.

Binary x[g, k] = 1 if group g takes option k:  minimise sum omega[g,k] x[g,k]
subject to  sum_k x[g,k] = 1 for every g,  sum size[g,k] x[g,k] <= size cap,
            sum bops[g,k] x[g,k] <= BOPs cap.
Unlike the dynamic program it handles both budgets at once.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from hawq.alloc.options import Group

OBJ_SCALE = 1e3


def solve_ilp(
    groups: Sequence[Group],
    size_cap: int | None = None,
    bops_cap: int | None = None,
    time_limit_s: float = 60.0,
) -> list[int] | None:
    """Option index per group of the min-Omega choice within the caps, or None if infeasible."""
    if not groups:
        return []
    sizes = [len(g.choices) for g in groups]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n = int(offsets[-1])
    # Shift each group's Omega to start at 0 (same argmin) and scale the largest to OBJ_SCALE, so that
    # HiGHS's absolute gap (1e-6) cannot hide differences that matter.
    c = np.concatenate([g.omega - g.omega.min() for g in groups])
    if c.max() > 0:
        c = c * (OBJ_SCALE / c.max())
    one = np.zeros((len(groups), n))
    for g in range(len(groups)):
        one[g, offsets[g] : offsets[g + 1]] = 1.0
    cons = [LinearConstraint(one, 1.0, 1.0)]
    caps = []
    if size_cap is not None:
        caps.append((np.concatenate([g.size_bits for g in groups]), size_cap))
    if bops_cap is not None:
        caps.append((np.concatenate([g.bops for g in groups]), bops_cap))
    for coef, cap in caps:
        # Subtract each group's cheapest option: small coefficients and cap, better conditioned.
        lo = np.concatenate(
            [np.full(hi - lo_, coef[lo_:hi].min()) for lo_, hi in zip(offsets[:-1], offsets[1:])]
        )
        rel = (coef - lo).astype(np.float64)
        cons.append(LinearConstraint(rel[None, :], -np.inf, float(cap - int(lo[offsets[:-1]].sum()))))
    while True:
        res = milp(
            c,
            constraints=cons,
            integrality=np.ones(n),
            bounds=Bounds(0, 1),
            options={"mip_rel_gap": 0.0, "time_limit": time_limit_s, "presolve": True},
        )
        if res.x is None:
            if res.status not in (2,):  # 2: infeasible
                warnings.warn(
                    f"HiGHS stopped without a solution: {res.message}", RuntimeWarning, stacklevel=2
                )
            return None
        if res.status != 0:
            warnings.warn(f"HiGHS plan is not proven optimal: {res.message}", RuntimeWarning, stacklevel=2)
        x = np.round(res.x).astype(np.int64)
        choice = [int(np.argmax(x[offsets[g] : offsets[g + 1]])) for g in range(len(groups))]
        # Integrality tolerances can let a rounded solution overshoot a cap by a few units: tighten and retry.
        over = False
        for k, (coef, cap) in enumerate(caps):
            used = sum(int(coef[offsets[g] + choice[g]]) for g in range(len(groups)))
            if used > cap:
                lc = cons[1 + k]
                cons[1 + k] = LinearConstraint(lc.A, lc.lb, lc.ub - (used - cap))
                over = True
        if not over:
            return choice
