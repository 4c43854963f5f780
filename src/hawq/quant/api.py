"""Apply a bit plan to a model: `quantize_(model, plan)` swaps layers in place for fake-quant ones."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hawq.quant.attention import hidden_linear_layers
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
    """Fully qualified names of the Conv2d and Linear layers, in module order.

    Linear layers that attention applies by their weight without calling them (nn.MultiheadAttention's
    out_proj, torchvision Swin's qkv/proj) are left out: `decompose_attention_(model)` makes them layers.
    """
    hidden = set(hidden_linear_layers(model))
    return [name for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and name not in hidden]


def _not_quantizable(model: nn.Module, fqn: str) -> str:
    if fqn in hidden_linear_layers(model):
        return (f"plan names layer {fqn!r}, a projection inside attention that is applied without calling it: "
                "call hawq.decompose_attention_(model) first")
    return f"plan names layer {fqn!r}, which is not a Conv2d/Linear layer of the model"


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
                raise ValueError(_not_quantizable(model, key))
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


def _tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []


def first_last_layers(model: nn.Module, example_input: Tensor) -> tuple[str, str]:
    """(first, last) quantizable layer, found from one eval-mode forward of `example_input`, not by
    module order: the first layer executed whose input depends on the model input, and the last layer
    executed whose output the model output depends on (so an auxiliary head that the forward skips, or
    that does not feed the logits, is neither)."""
    names = set(quantizable_layers(model))
    if not names:
        raise ValueError("the model has no Conv2d/Linear layer to quantize")
    calls: list[tuple[str, bool, Tensor]] = []  # (fqn, reads the input, output) in execution order

    def hook(fqn: str):
        def fn(module: nn.Module, args: tuple, output: Any) -> None:
            reads = any(t.requires_grad for t in _tensors(args))
            out = _tensors(output)
            calls.append((fqn, reads, out[0] if out else None))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n in names]
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    try:
        model.requires_grad_(False)  # only the input carries requires_grad: it marks what depends on it
        x = example_input.detach().clone()
        x.requires_grad_(x.is_floating_point())
        with torch.enable_grad():
            try:
                y = model(x)
            except (RuntimeError, AssertionError, TypeError, IndexError) as e:
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ValueError(f"the model fails on an input of shape {tuple(x.shape)} ({reason}): check the "
                                 "model's expected input (--image-size, in_channels)") from e
            outputs = [t for t in _tensors(y) if t.requires_grad]
            tracked = [(f, o) for f, _, o in calls if o is not None and o.requires_grad]
            grads = torch.autograd.grad(sum(o.float().sum() for o in outputs), [o for _, o in tracked],
                                        allow_unused=True) if outputs and tracked else []
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    if not calls:
        raise ValueError("no Conv2d/Linear layer ran in the model's forward on the example input")
    first = next((f for f, reads, _ in calls if reads), calls[0][0])
    feeding = [f for (f, _), g in zip(tracked, grads) if g is not None]
    last = feeding[-1] if feeding else calls[-1][0]
    return first, last
