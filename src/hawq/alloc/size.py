"""Size and BOPs accounting of a bit plan.

Size counts model parameters only: n_i * w_bits_i for every layer of the table, 32 bits for every other
parameter (biases, batch-norm affine parameters, layers outside the table); batch-norm running statistics
are buffers and not counted. BOPs (bit operations per image) = sum_i MACs_i * w_bits_i * a_bits_i, with
a_bits None (float activations) counted as 32.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hawq.alloc.options import FLOAT_BITS
from hawq.alloc.sensitivity import SensitivityTable

MB = 2**20  # bytes per MB in messages and reports (the convention of the HAWQ papers: ResNet-50 = 97.8 MB)


def _w_bits_of(table: SensitivityTable, w_bits: Mapping[str, int] | int) -> dict[str, int]:
    """Full per-layer weight bits; an int sets every free layer, fixed layers keep their one option."""
    if isinstance(w_bits, bool):
        raise ValueError("w_bits must be an int or a mapping fqn -> int")
    if isinstance(w_bits, int):
        if w_bits not in table.bits:
            raise ValueError(
                f"{w_bits} bits is not a candidate of the table {table.bits}: rebuild the table with it"
            )
        return {r.fqn: r.bits[0] if r.fixed else w_bits for r in table.layers}
    unknown = [f for f in w_bits if f not in table]
    if unknown:
        raise ValueError(f"w_bits names {unknown}, which are not in the sensitivity table")
    out = {}
    for r in table.layers:
        b = w_bits.get(r.fqn, r.bits[0] if r.fixed else None)
        if b is None:
            raise ValueError(f"w_bits lacks layer {r.fqn!r}: give bits for every free layer of the table")
        if int(b) not in r.bits:
            raise ValueError(f"layer {r.fqn!r} at {b} bits is not an option; its options are {r.bits}")
        out[r.fqn] = int(b)
    return out


def model_size_bits(table: SensitivityTable, w_bits: Mapping[str, int] | int) -> int:
    bits = _w_bits_of(table, w_bits)
    return sum(r.n_params * bits[r.fqn] for r in table.layers) + FLOAT_BITS * table.other_params


def model_size_bytes(table: SensitivityTable, w_bits: Mapping[str, int] | int) -> float:
    """Size in bytes of the model's parameters under `w_bits` (see the module docstring)."""
    return model_size_bits(table, w_bits) / 8


def min_size_bytes(table: SensitivityTable) -> float:
    """The smallest feasible size: every layer at its lowest allowed bit width."""
    return model_size_bytes(table, {r.fqn: min(r.bits) for r in table.layers})


def fp32_size_bytes(table: SensitivityTable) -> float:
    """Size in bytes with every parameter in 32-bit float."""
    return 4.0 * (sum(r.n_params for r in table.layers) + table.other_params)


def plan_bops(
    table: SensitivityTable, w_bits: Mapping[str, int] | int, a_bits: Mapping[str, int | None] | None = None
) -> float | None:
    """Bit operations per image; None when the table has no MACs (built without example_input)."""
    if not any(r.macs > 0 for r in table.layers):
        return None
    bits = _w_bits_of(table, w_bits)
    a_bits = a_bits or {}
    total = 0
    for r in table.layers:
        a = a_bits.get(r.fqn)
        total += r.macs * bits[r.fqn] * (FLOAT_BITS if a is None else a)
    return float(total)


def size_report(table: SensitivityTable, plan: Any) -> dict[str, float | None]:
    """Size, compression (whole model and quantized layers alone), and average weight bits of a plan.

    `plan` is a `Plan` or a mapping fqn -> w_bits.
    """
    w_bits = _w_bits_of(table, getattr(plan, "w_bits", plan))
    a_bits = getattr(plan, "a_bits", None)
    n_q = sum(r.n_params for r in table.layers)
    q_bits = sum(r.n_params * w_bits[r.fqn] for r in table.layers)
    size = model_size_bytes(table, w_bits)
    fp32 = fp32_size_bytes(table)
    return {
        "size_bytes": size,
        "size_mb": size / MB,
        "fp32_bytes": fp32,
        "compression": fp32 / size if size > 0 else 1.0,
        "quantized_fp32_bytes": 4.0 * n_q,
        "quantized_bytes": q_bits / 8,
        "quantized_compression": (32.0 * n_q / q_bits) if q_bits > 0 else 1.0,
        "avg_w_bits": q_bits / n_q if n_q > 0 else 0.0,
        "bops": plan_bops(table, w_bits, a_bits),
    }
