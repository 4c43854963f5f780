"""Per-layer sensitivity Omega_i(b) of HAWQ-V2 (Dong et al., arXiv 1911.03852, Eq. 3).

    Omega_i(b)      = Tr(H_i)/n_i * ||Q_b(W_i) - W_i||^2          (kind "trace")
    Omega_diag_i(b) = 1/2 * sum_j H_jj (Q_b(W_i)_j - W_ij)^2       (kind "diag", finer variant)

A `SensitivityTable` holds, for every layer that gets a bit width, its allowed options (one if the user
fixed it) and Omega per option, plus the number of parameters that stay in float. The allocators
(`hawq.alloc.frontier`, `plan`, `joint`) read only this table, never the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hawq.quant import check_bits, fake_quant_weight, first_last_layers, quantizable_layers, weight_perturbation

TABLE_KINDS = ("trace", "diag")


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer's row: Omega and ||Q_b(W)-W||^2 for each allowed weight bit width."""

    fqn: str
    n_params: int
    trace: float  # average Hessian trace Tr(H)/n
    bits: tuple[int, ...]  # allowed options, ascending (one if fixed)
    perturbation: dict[int, float]  # ||Q_b(W) - W||^2 per option
    omega: dict[int, float]  # per option
    macs: int = 0  # per-image multiply-accumulates (for BOPs), 0 if unknown

    def __post_init__(self) -> None:
        if not self.bits:
            raise ValueError(f"layer {self.fqn!r} has no bit-width option: give at least one")
        for b in self.bits:
            check_bits(b)
            if b not in self.omega or b not in self.perturbation:
                raise ValueError(f"layer {self.fqn!r} lacks omega for {b} bits: rebuild the table")
        if self.n_params <= 0:
            raise ValueError(f"layer {self.fqn!r} has n_params={self.n_params}: it must be positive")

    @property
    def fixed(self) -> bool:
        return len(self.bits) == 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "fqn": self.fqn,
            "n_params": self.n_params,
            "trace": self.trace,
            "bits": list(self.bits),
            "perturbation": {str(b): v for b, v in self.perturbation.items()},
            "omega": {str(b): v for b, v in self.omega.items()},
            "macs": self.macs,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerSensitivity:
        return cls(
            fqn=str(d["fqn"]),
            n_params=int(d["n_params"]),
            trace=float(d["trace"]),
            bits=tuple(int(b) for b in d["bits"]),
            perturbation={int(b): float(v) for b, v in d["perturbation"].items()},
            omega={int(b): float(v) for b, v in d["omega"].items()},
            macs=int(d.get("macs", 0)),
        )


@dataclass(frozen=True)
class SensitivityTable:
    """Rows in model order; `other_params` are parameters outside the table, kept at 32 bits."""

    layers: tuple[LayerSensitivity, ...]
    other_params: int
    bits: tuple[int, ...]  # the candidate bit widths of the free layers
    kind: str = "trace"
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in TABLE_KINDS:
            raise ValueError(f"table kind {self.kind!r} is unknown: use one of {TABLE_KINDS}")
        if self.other_params < 0:
            raise ValueError(f"other_params={self.other_params} is negative: count the model's parameters")
        names = [layer.fqn for layer in self.layers]
        if len(set(names)) != len(names):
            raise ValueError("a sensitivity table names a layer twice: give each fqn once")
        self._index.update({n: i for i, n in enumerate(names)})

    @property
    def fqns(self) -> tuple[str, ...]:
        return tuple(layer.fqn for layer in self.layers)

    def __getitem__(self, fqn: str) -> LayerSensitivity:
        if fqn not in self._index:
            raise ValueError(f"layer {fqn!r} is not in the sensitivity table: use one of {list(self._index)}")
        return self.layers[self._index[fqn]]

    def index(self, fqn: str) -> int:
        self[fqn]  # raises a ValueError naming the known layers
        return self._index[fqn]

    def __contains__(self, fqn: object) -> bool:
        return fqn in self._index

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "other_params": self.other_params,
            "bits": list(self.bits),
            "kind": self.kind,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SensitivityTable:
        return cls(
            layers=tuple(LayerSensitivity.from_dict(x) for x in d["layers"]),
            other_params=int(d["other_params"]),
            bits=tuple(int(b) for b in d["bits"]),
            kind=_table_kind(d),
        )


def _table_kind(d: Mapping[str, Any]) -> str:
    # Inside a run artifact "kind" names the artifact ("sensitivity"), so the table's own kind may be
    # stored as "measure" instead.
    if "measure" in d:
        return str(d["measure"])
    return str(d["kind"]) if d.get("kind") in TABLE_KINDS else "trace"


def default_fixed(model: nn.Module, example_input: Tensor | None = None) -> dict[str, int]:
    """First and last quantizable layer stay at 8 bits (the paper's convention).

    With `example_input` they are found from one forward (`hawq.first_last_layers`: the first layer that
    reads the input, the last whose output feeds the model output); without it, by module order.
    """
    if example_input is not None:
        first, last = first_last_layers(model, example_input)
        return {first: 8, last: 8}
    names = quantizable_layers(model)
    return {names[0]: 8, names[-1]: 8} if names else {}


@torch.no_grad()
def layer_macs(model: nn.Module, example_input: Tensor) -> dict[str, int]:
    """Per-image multiply-accumulates of every Conv2d and Linear layer, from one forward pass.

    Conv2d: out_elements * in_channels/groups * kernel area; Linear: out_elements * in_features.
    A layer called several times counts every call. `example_input` is (B, ...); counts are divided by B.
    """
    if example_input.dim() < 1 or example_input.shape[0] < 1:
        raise ValueError("example_input must be a batch (B, ...) with B >= 1")
    batch = example_input.shape[0]
    macs: dict[str, int] = {name: 0 for name in quantizable_layers(model)}

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if isinstance(module, nn.Conv2d):
                per_out = module.in_channels // module.groups * math.prod(module.kernel_size)
            else:
                per_out = module.in_features
            macs[name] += output.numel() * per_out

        return fn

    handles = [
        m.register_forward_hook(hook(name))
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    was_training = model.training
    model.eval()
    try:
        model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {name: total // batch for name, total in macs.items()}


def _diag_omega(w: Tensor, diag: Tensor, bits: int, fqn: str, weight_range: str = "mse") -> float:
    if diag.numel() != w.numel():
        raise ValueError(
            f"diagonal of {fqn!r} has {diag.numel()} entries, not {w.numel()}: pass H_jj per weight"
        )
    with torch.no_grad():
        err = (fake_quant_weight(w, bits, weight_range) - w).double().reshape(-1)
        return 0.5 * float((diag.detach().double().reshape(-1).to(err.device) * err.pow(2)).sum())


def sensitivity_table(
    model: nn.Module,
    traces: Mapping[str, float],
    bits: Sequence[int] = (2, 3, 4, 8),
    fixed: Mapping[str, int] | None = None,
    diagonals: Mapping[str, Tensor] | None = None,
    example_input: Tensor | None = None,
    progress: bool = True,
    weight_range: str = "mse",
) -> SensitivityTable:
    """Build the table from average traces Tr(H_i)/n_i (keyed by fqn).

    The table holds every Conv2d/Linear layer that has a trace or is fixed, in model order; other layers
    stay in float. `fixed` maps fqn -> bits (default: first and last layer at 8 bits; pass {} to free
    them); a fixed layer without a trace gets trace 0 (its Omega is a constant of every plan). With
    `diagonals` (fqn -> H_jj per weight), Omega uses the diagonal (kind "diag"). With `example_input`,
    each row also holds its per-image MACs for BOPs. A bar shows after 2 s unless `progress=False`.
    `weight_range` is the quantizer's range ("mse" clipping, as `hawq.quantize_` applies it, or "max"), so
    ||Q(W) - W||^2 and Omega are those of the model the plan produces.
    """
    cand = tuple(sorted({check_bits(int(b)) for b in bits}))
    if not cand:
        raise ValueError("bits is empty: give candidate bit widths, e.g. (2, 3, 4, 8)")
    names = quantizable_layers(model)
    fixed = default_fixed(model) if fixed is None else dict(fixed)
    for src, what in ((traces, "traces"), (fixed, "fixed"), (diagonals or {}, "diagonals")):
        unknown = [k for k in src if k not in names]
        if unknown:
            raise ValueError(f"{what} names {unknown}, which are not Conv2d/Linear layers of the model")
    for b in fixed.values():
        check_bits(int(b))
    for fqn, t in traces.items():
        if not math.isfinite(float(t)):
            raise ValueError(f"trace of {fqn!r} is {t}: recompute the traces (every value must be finite)")
    kind = "diag" if diagonals else "trace"
    macs = layer_macs(model, example_input) if example_input is not None else {}

    rows = []
    todo = [f for f in names if f in traces or f in fixed]
    for fqn in tqdm(todo, desc="sensitivity", unit="layer", disable=not progress, delay=2.0, leave=False):
        w = model.get_submodule(fqn).weight
        n = w.numel()
        t = float(traces.get(fqn, 0.0))
        opts = (int(fixed[fqn]),) if fqn in fixed else cand
        pert = {b: weight_perturbation(w, b, weight_range) for b in opts}
        if diagonals and fqn in diagonals:
            omega = {b: _diag_omega(w, diagonals[fqn], b, fqn, weight_range) for b in opts}
        elif diagonals and fqn not in fixed:
            raise ValueError(f"diagonals lack layer {fqn!r}: give H_jj for every free layer, or none")
        else:
            omega = {b: t * pert[b] for b in opts}
        rows.append(LayerSensitivity(fqn, n, t, opts, pert, omega, macs.get(fqn, 0)))

    total = sum(p.numel() for p in model.parameters())  # shared parameters count once
    other = total - sum(r.n_params for r in rows)
    return SensitivityTable(tuple(rows), other, cand, kind)


def sizing_table(
    model: nn.Module, bits: Sequence[int] = (2, 3, 4, 8), fixed: Mapping[str, int] | None = None
) -> SensitivityTable:
    """A table with every Conv2d/Linear layer and Omega = 0: sizes and bounds without quantizing anything.

    Cheap (no weight is quantized): use it to check a budget before traces exist, e.g.
    `model_size_bytes(sizing_table(model), 2)` is the smallest size when every free layer takes 2 bits.
    """
    cand = tuple(sorted({check_bits(int(b)) for b in bits}))
    if not cand:
        raise ValueError("bits is empty: give candidate bit widths, e.g. (2, 3, 4, 8)")
    fixed = default_fixed(model) if fixed is None else dict(fixed)
    names = quantizable_layers(model)
    unknown = [k for k in fixed if k not in names]
    if unknown:
        raise ValueError(f"fixed names {unknown}, which are not Conv2d/Linear layers of the model")
    rows = []
    for fqn in names:
        opts = (check_bits(int(fixed[fqn])),) if fqn in fixed else cand
        zero = {b: 0.0 for b in opts}
        rows.append(
            LayerSensitivity(fqn, model.get_submodule(fqn).weight.numel(), 0.0, opts, zero, dict(zero))
        )
    other = sum(p.numel() for p in model.parameters()) - sum(r.n_params for r in rows)
    return SensitivityTable(tuple(rows), other, cand)
