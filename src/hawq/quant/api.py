"""Apply a bit plan to a model: `quantize_(model, plan)` swaps layers in place for fake-quant ones."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hawq.quant.modules import QUANT_MODULES, QuantConv2d, QuantLinear
from hawq.quant.primitives import check_bits


@dataclass(frozen=True)
class LayerBits:
    """Bit widths of one layer; None keeps that part in float."""

    w_bits: int | None
    a_bits: int | None = None

    def __post_init__(self) -> None:
        for b in (self.w_bits, self.a_bits):
            if b is not None:
                check_bits(b)

    def to_dict(self) -> dict[str, int | None]:
        return {"w_bits": self.w_bits, "a_bits": self.a_bits}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | int) -> LayerBits:
        if isinstance(d, int):
            return cls(d, None)
        return cls(d.get("w_bits"), d.get("a_bits"))


def quantizable_layers(model: nn.Module) -> list[str]:
    """Fully qualified names of the Conv2d and Linear layers, in module order."""
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _as_bits_mapping(plan: Any) -> dict[str, LayerBits]:
    layers = getattr(plan, "layers", plan)
    if not isinstance(layers, Mapping):
        raise ValueError("a plan is a mapping from layer name (or 're:' pattern) to bits, or a Plan object")
    out = {}
    for key, v in layers.items():
        out[key] = v if isinstance(v, LayerBits) else LayerBits.from_dict(v)
    return out


def resolve_plan(model: nn.Module, plan: Any) -> dict[str, LayerBits]:
    """Expand `re:` patterns and check every name against the model's quantizable layers."""
    names = quantizable_layers(model)
    resolved: dict[str, LayerBits] = {}
    for key, bits in _as_bits_mapping(plan).items():
        if key.startswith("re:"):
            pattern = re.compile(key[3:])
            hits = [n for n in names if pattern.fullmatch(n)]
            if not hits:
                raise ValueError(f"plan pattern {key!r} matches no Conv2d/Linear layer of the model")
            for n in hits:
                resolved.setdefault(n, bits)
        else:
            if key not in names:
                raise ValueError(f"plan names layer {key!r}, which is not a Conv2d/Linear layer of the model")
            resolved[key] = bits
    return resolved


def _set_module(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_(model: nn.Module, plan: Any) -> nn.Module:
    """Replace the plan's layers of `model` in place by fake-quantized ones (parameters are shared).

    `plan` maps a layer fqn (or `re:` pattern) to `LayerBits`, `{"w_bits": .., "a_bits": ..}` or an int
    (weight bits). Layers already quantized get their bit widths updated.
    """
    for fqn, bits in resolve_plan(model, plan).items():
        m = model.get_submodule(fqn)
        if isinstance(m, (QuantConv2d, QuantLinear)):
            m.w_bits, m.a_bits = bits.w_bits, bits.a_bits
            continue
        cls = QUANT_MODULES[type(m)] if type(m) in QUANT_MODULES else None
        if cls is None:
            raise ValueError(f"layer {fqn!r} is a {type(m).__name__}; only Conv2d and Linear can be quantized")
        _set_module(model, fqn, cls.from_float(m, bits.w_bits, bits.a_bits))
    return model


def dequantize_(model: nn.Module) -> nn.Module:
    """Turn every fake-quant layer back into its float layer, in place."""
    for name, m in list(model.named_modules()):
        if isinstance(m, (QuantConv2d, QuantLinear)):
            _set_module(model, name, m.to_float())
    return model


def quant_layers(model: nn.Module) -> dict[str, QuantConv2d | QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}


@torch.no_grad()
def calibrate_(model: nn.Module, batches: Iterable[Any], n_batches: int | None = None) -> nn.Module:
    """Record every fake-quant layer's input range (min/max) over `batches` of (inputs, ...)."""
    layers = quant_layers(model).values()
    was_training = model.training
    model.eval()
    for m in layers:
        m.act_min.fill_(float("inf"))
        m.act_max.fill_(float("-inf"))
        m.calibrating = True
    try:
        for i, batch in enumerate(batches):
            if n_batches is not None and i >= n_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if isinstance(x, torch.Tensor):
                x = x.to(next(model.parameters()).device)
            model(x)
    finally:
        for m in layers:
            m.calibrating = False
        model.train(was_training)
    return model
