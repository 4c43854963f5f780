"""The choice problem behind every allocator: groups of layers, each picking one option.

A group is one layer, or several tied layers that must share their bits. Each option of a group is a
(w_bits, a_bits) pair with an integer size in bits, integer BOPs, and Omega (summed over the members).
Both the dynamic program (`frontier.py`) and the integer program (`ilp.py`) solve this problem.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hawq.alloc.sensitivity import SensitivityTable
from hawq.quant import check_bits

FLOAT_BITS = 32


@dataclass(frozen=True)
class Group:
    members: tuple[int, ...]  # row indices into the table
    choices: tuple[tuple[int, int | None], ...]  # (w_bits, a_bits) per option
    size_bits: np.ndarray  # (k,) int64
    bops: np.ndarray  # (k,) int64, per image
    omega: np.ndarray  # (k,) float64


def other_bits(table: SensitivityTable) -> int:
    return FLOAT_BITS * table.other_params


def _tie_sets(table: SensitivityTable, ties: Iterable[Sequence[str]]) -> list[tuple[int, ...]]:
    """Union of the tie groups (a layer in two ties joins them); singletons for untied layers."""
    parent = list(range(len(table.layers)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for tie in ties:
        if isinstance(tie, str):
            raise ValueError(f"a tie is a group of layer names, got the string {tie!r}: pass [(a, b)]")
        idx = [table.index(f) for f in tie]
        for i in idx[1:]:
            parent[root(i)] = root(idx[0])
    sets: dict[int, list[int]] = {}
    for i in range(len(table.layers)):
        sets.setdefault(root(i), []).append(i)
    return [tuple(s) for s in sorted(sets.values())]


def build_groups(
    table: SensitivityTable,
    a_bits: Sequence[int | None] = (None,),
    act_omega: Mapping[str, Mapping[int, float]] | None = None,
    ties: Iterable[Sequence[str]] = (),
) -> list[Group]:
    """Options w x a per group, intersected over tied layers.

    Fixed layers (one weight option) keep their weight bits as activation bits when `act_omega` is given
    (first and last layer stay at 8/8); their activation Omega is 0 where the caller gives none. A free
    layer needs act_omega for every a_bits option.
    """
    if not a_bits:
        raise ValueError("a_bits is empty: give activation bit options, e.g. (4, 8)")
    for a in a_bits:
        if a is not None:
            check_bits(a)
    groups = []
    for members in _tie_sets(table, ties):
        common: set[tuple[int, int | None]] | None = None
        per_layer = []
        for i in members:
            row = table.layers[i]
            if act_omega is not None and row.fixed:
                opts = {(row.bits[0], row.bits[0])}
            else:
                opts = {(w, a) for w in row.bits for a in a_bits}
            per_layer.append(row)
            common = opts if common is None else common & opts
        if not common:
            names = [r.fqn for r in per_layer]
            raise ValueError(f"tied layers {names} share no bit option: untie them or unfix them")
        choices = tuple(sorted(common, key=lambda wa: (wa[0], -1 if wa[1] is None else wa[1])))
        size = np.zeros(len(choices), np.int64)
        bops = np.zeros(len(choices), np.int64)
        omega = np.zeros(len(choices), np.float64)
        for row in per_layer:
            aom = None if act_omega is None else act_omega.get(row.fqn)
            if act_omega is not None and aom is None and not row.fixed:
                raise ValueError(f"act_omega lacks layer {row.fqn!r}: give it for every free layer")
            for k, (w, a) in enumerate(choices):
                size[k] += row.n_params * w
                bops[k] += row.macs * w * (FLOAT_BITS if a is None else a)
                omega[k] += row.omega[w]
                if aom is not None and a is not None:
                    if a not in aom:
                        if row.fixed:
                            continue
                        raise ValueError(f"act_omega[{row.fqn!r}] lacks {a} bits: give every a_bits option")
                    omega[k] += float(aom[a])
        groups.append(Group(members, choices, size, bops, omega))
    return groups


def decode(
    table: SensitivityTable, groups: Sequence[Group], choice: Sequence[int]
) -> tuple[dict[str, int], dict[str, int | None]]:
    """Option index per group -> (w_bits, a_bits) per layer, in table order."""
    w_bits: list[int] = [0] * len(table.layers)
    a_bits: list[int | None] = [None] * len(table.layers)
    for g, k in zip(groups, choice):
        w, a = g.choices[int(k)]
        for i in g.members:
            w_bits[i], a_bits[i] = w, a
    return (
        {r.fqn: w_bits[i] for i, r in enumerate(table.layers)},
        {r.fqn: a_bits[i] for i, r in enumerate(table.layers)},
    )
