"""Random sensitivity tables and brute force over every plan: the reference the allocators must equal."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pytest

from hawq.alloc import LayerSensitivity, SensitivityTable


def make_table(
    seed: int,
    n_layers: int = 5,
    bits: Sequence[int] = (2, 3, 4, 8),
    fixed: Mapping[int, int] | None = None,
    int_omega: bool = False,
    other_params: int = 7,
) -> SensitivityTable:
    """Random table; `int_omega` draws small integer Omegas and sizes so that exact ties abound."""
    rng = np.random.default_rng(seed)
    fixed = fixed or {}
    rows = []
    for i in range(n_layers):
        n = int(rng.integers(1, 4) if int_omega else rng.integers(1, 60))
        opts = (fixed[i],) if i in fixed else tuple(sorted(bits))
        if int_omega:
            omega = {b: float(rng.integers(0, 4)) for b in opts}
        else:
            trace = float(10 ** rng.uniform(-2, 1))
            omega = {b: trace * n * 4.0**-b * float(rng.uniform(0.5, 1.5)) for b in opts}
        pert = {b: float(rng.uniform(0, 1)) for b in opts}
        rows.append(LayerSensitivity(f"layer{i}", n, 1.0, opts, pert, omega, int(rng.integers(1, 500))))
    return SensitivityTable(tuple(rows), other_params, tuple(sorted(bits)))


def all_plans(
    table: SensitivityTable,
    a_bits: Sequence[int | None] = (None,),
    act_omega: Mapping[str, Mapping[int, float]] | None = None,
    ties: Sequence[Sequence[str]] = (),
) -> list[tuple[int, int, float, tuple[int, ...], tuple]]:
    """Every plan as (size_bits, bops, omega, w_bits, a_bits), computed straight from the table."""
    per_layer = []
    for r in table.layers:
        if act_omega is not None and r.fixed:
            per_layer.append([(r.bits[0], r.bits[0])])
        else:
            per_layer.append([(w, a) for w in r.bits for a in a_bits])
    idx = {r.fqn: i for i, r in enumerate(table.layers)}
    out = []
    for combo in itertools.product(*per_layer):
        if any(len({combo[idx[f]] for f in tie}) > 1 for tie in ties):
            continue
        size = 32 * table.other_params
        bops = 0
        omega = 0.0
        for r, (w, a) in zip(table.layers, combo):
            size += r.n_params * w
            bops += r.macs * w * (32 if a is None else a)
            omega += r.omega[w]
            if act_omega is not None and a is not None:
                omega += act_omega.get(r.fqn, {}).get(a, 0.0)
        out.append((size, bops, omega, tuple(c[0] for c in combo), tuple(c[1] for c in combo)))
    return out


def brute_frontier(plans: list, cost: int = 0) -> list[tuple[int, float]]:
    """(cost, omega) of the non-dominated plans; cost index 0 = size bits, 1 = BOPs."""
    pts = sorted((p[cost], p[2]) for p in plans)
    front: list[tuple[int, float]] = []
    for c, om in pts:
        if not front or om < front[-1][1]:
            if front and front[-1][0] == c:
                continue
            front.append((c, om))
    return front


def brute_best(plans: list, size_cap: float | None = None, bops_cap: float | None = None) -> float | None:
    ok = [
        p[2]
        for p in plans
        if (size_cap is None or p[0] <= size_cap) and (bops_cap is None or p[1] <= bops_cap)
    ]
    return min(ok) if ok else None


@pytest.fixture
def table_factory() -> Callable[..., SensitivityTable]:
    return make_table


@pytest.fixture
def brute() -> object:
    class Brute:
        plans = staticmethod(all_plans)
        frontier = staticmethod(brute_frontier)
        best = staticmethod(brute_best)

    return Brute
