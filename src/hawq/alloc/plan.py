"""Bit plans: `Plan` (accepted by `hawq.quantize_`), uniform plans, and the best plan under a size budget."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hawq.alloc.frontier import FrontierPoint, solve_caps
from hawq.alloc.options import build_groups, decode, other_bits
from hawq.alloc.sensitivity import SensitivityTable
from hawq.alloc.size import MB, _w_bits_of, model_size_bytes, plan_bops
from hawq.quant import check_bits

NO_CAP = 2**62  # far above any model's size in bits or BOPs, still an int64


@dataclass(frozen=True)
class Plan:
    """Weight and activation bits per layer fqn (a_bits None = float input), with size, Omega, BOPs.

    `plan.layers` maps fqn -> {"w_bits", "a_bits"}, the shape `hawq.quantize_(model, plan)` reads.
    """

    w_bits: dict[str, int]
    a_bits: dict[str, int | None]
    size_bytes: float
    omega: float
    bops: float | None = None

    def __post_init__(self) -> None:
        if set(self.a_bits) != set(self.w_bits):
            raise ValueError("a plan's a_bits and w_bits must name the same layers")
        for b in list(self.w_bits.values()) + [a for a in self.a_bits.values() if a is not None]:
            check_bits(b)

    @property
    def layers(self) -> dict[str, dict[str, int | None]]:
        return {f: {"w_bits": b, "a_bits": self.a_bits[f]} for f, b in self.w_bits.items()}

    @property
    def size_mb(self) -> float:
        return self.size_bytes / MB

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "size_bytes": self.size_bytes, "omega": self.omega, "bops": self.bops}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        layers = d["layers"]
        return cls(
            w_bits={f: int(v["w_bits"]) for f, v in layers.items()},
            a_bits={f: None if v.get("a_bits") is None else int(v["a_bits"]) for f, v in layers.items()},
            size_bytes=float(d["size_bytes"]),
            omega=float(d["omega"]),
            bops=None if d.get("bops") is None else float(d["bops"]),
        )


def plan_omega(
    table: SensitivityTable,
    w_bits: Mapping[str, int],
    a_bits: Mapping[str, int | None] | None = None,
    act_omega: Mapping[str, Mapping[int, float]] | None = None,
) -> float:
    """Total Omega = sum_i Omega_i(w_i) (+ activation Omega_i(a_i) where act_omega gives it)."""
    total = 0.0
    for r in table.layers:
        total += r.omega[w_bits[r.fqn]]
        a = None if a_bits is None else a_bits.get(r.fqn)
        if act_omega is not None and a is not None and r.fqn in act_omega and a in act_omega[r.fqn]:
            total += float(act_omega[r.fqn][a])
    return total


def make_plan(
    table: SensitivityTable,
    w_bits: Mapping[str, int],
    a_bits: Mapping[str, int | None] | None = None,
    act_omega: Mapping[str, Mapping[int, float]] | None = None,
) -> Plan:
    """A Plan whose size, Omega and BOPs are recomputed from the table (in table order)."""
    w = _w_bits_of(table, w_bits)
    a = {f: (None if a_bits is None else a_bits.get(f)) for f in w}
    return Plan(
        w_bits=w,
        a_bits=a,
        size_bytes=model_size_bytes(table, w),
        omega=plan_omega(table, w, a, act_omega),
        bops=plan_bops(table, w, a),
    )


def plan_for_bits(
    table: SensitivityTable, w_bits: Mapping[str, int] | int, a_bits: int | None = None
) -> Plan:
    """Plan with the given weight bits: an int = every free layer at that width (fixed layers keep theirs).

    `a_bits` (optional) sets every layer's input activation bits.
    """
    w = _w_bits_of(table, w_bits)
    return make_plan(table, w, {f: a_bits for f in w})


def check_budget(value: float | None, what: str, flag: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or value <= 0:
        raise ValueError(f"{what} must be a positive number, got {value!r}: set {flag} above zero")


def budget_cap(value: float, units_per: int = 1) -> int:
    """Integer cap (bits or BOPs) of a budget; an infinite budget caps nothing."""
    return NO_CAP if math.isinf(value) else math.floor(value * units_per)


def bops_shortfall(budget_bops: float, smallest: int) -> ValueError:
    """The error for a BOPs budget below the cheapest plan's BOPs."""
    return ValueError(
        f"BOPs budget {budget_bops / 1e9:.6g} GBOPs is below the smallest feasible {smallest / 1e9:.6g} GBOPs "
        "(every layer at its lowest weight and activation bits): raise --budget-gbops"
    )


def best_plan(
    table: SensitivityTable,
    budget_bytes: float | None,
    a_bits: int | None = None,
    budget_bops: float | None = None,
) -> Plan:
    """The minimum-Omega weight-bit plan within `budget_bytes` and/or `budget_bops` (exact, by the Pareto DP).

    `a_bits` (optional) sets every layer's input activation bits (None: float, counted as 32 bits in BOPs);
    it changes the choice only through a BOPs budget (BOPs of a layer = MACs * w_bits * a_bits).
    """
    if budget_bytes is None and budget_bops is None:
        raise ValueError("give a size budget (budget_bytes), a BOPs budget (budget_bops), or both")
    check_budget(budget_bytes, "the size budget", "--budget-mb")
    check_budget(budget_bops, "the BOPs budget", "--budget-gbops")
    if budget_bops is not None and not any(r.macs > 0 for r in table.layers):
        raise ValueError("the table has no MACs, so BOPs are unknown: build it with example_input=a batch")
    groups = build_groups(table, (a_bits,))
    cap_bits = None if budget_bytes is None else budget_cap(budget_bytes, 8) - other_bits(table)
    smallest = sum(int(g.size_bits.min()) for g in groups) + other_bits(table)
    if cap_bits is not None and cap_bits < smallest - other_bits(table):
        raise ValueError(
            f"budget {budget_bytes / MB:.6g} MB is below the smallest feasible size "
            f"{smallest / 8 / MB:.6g} MB "
            "(every layer at its lowest bit width): raise --budget-mb"
        )
    bops_cap = None if budget_bops is None else budget_cap(budget_bops)
    least_bops = sum(int(g.bops.min()) for g in groups)
    if bops_cap is not None and bops_cap < least_bops:
        raise bops_shortfall(budget_bops, least_bops)
    choice = solve_caps(groups, cap_bits, bops_cap)
    if choice is None:
        raise ValueError("no plan meets both the size and the BOPs budget: raise --budget-mb or --budget-gbops")
    w, _ = decode(table, groups, choice)
    return make_plan(table, w, {f: a_bits for f in w})


def plan_from_point(
    table: SensitivityTable, point: FrontierPoint, act_omega: Mapping[str, Mapping[int, float]] | None = None
) -> Plan:
    """The Plan of a frontier point."""
    w = dict(zip(table.fqns, point.w_bits))
    a = None if point.a_bits is None else dict(zip(table.fqns, point.a_bits))
    return make_plan(table, w, a, act_omega)
