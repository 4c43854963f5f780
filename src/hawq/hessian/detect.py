"""Is a network piecewise linear in each layer's weights? (When the Gauss-Newton trace is exact.)

One forward pass on a single input is recorded with a TorchFunctionMode. Smooth nonlinearities (GELU,
SiLU, sigmoid, tanh, softmax inside the net, layer/group norm, exp, ...) and products of two tensors that
both depend on the weights (attention, squeeze-excitation) make the output curved in the weights, so the
Gauss-Newton block only approximates the Hessian block. Batch norm with batch statistics couples images.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

_SMOOTH = {
    "gelu",
    "silu",
    "sigmoid",
    "tanh",
    "softplus",
    "elu",
    "selu",
    "celu",
    "mish",
    "hardswish",
    "logsigmoid",
    "softmax",
    "log_softmax",
    "softmin",
    "softsign",
    "tanhshrink",
    "layer_norm",
    "group_norm",
    "instance_norm",
    "local_response_norm",
    "rms_norm",
    "exp",
    "expm1",
    "log",
    "log1p",
    "sqrt",
    "rsqrt",
    "pow",
    "__pow__",
    "square",
    "erf",
    "normalize",
    "reciprocal",
    "sin",
    "cos",
    "scaled_dot_product_attention",
    "multi_head_attention_forward",
    "glu",
    "prelu",
    "rrelu",
}
_BILINEAR = {
    "mul",
    "__mul__",
    "__rmul__",
    "matmul",
    "__matmul__",
    "bmm",
    "einsum",
    "div",
    "__truediv__",
    "mul_",
    "__imul__",
    "baddbmm",
    "addcmul",
}
_PRETTY = {"gelu": "GELU", "silu": "SiLU", "hardswish": "Hardswish", "sigmoid": "Sigmoid", "tanh": "Tanh"}


def _tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


class _Recorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.curved: set[str] = set()
        self.batch_stats = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _SMOOTH:
            self.curved.add(_PRETTY.get(name, name))
        elif name in _BILINEAR:
            if sum(t.requires_grad for t in _tensors((args, kwargs))) >= 2:
                self.curved.add(f"product of two activations ({name})")
        elif name == "batch_norm":
            training = kwargs.get("training", args[5] if len(args) > 5 else False)
            if training:
                self.batch_stats = True
        return func(*args, **kwargs)


def inspect_model(model: nn.Module, x: Tensor) -> tuple[list[str], bool, int]:
    """Run one forward on x[:1]; return (curved op names, uses batch statistics, output width)."""
    rec = _Recorder()
    x = x[:1].detach().clone()
    if x.is_floating_point():
        x.requires_grad_(True)  # so products of two activations show up whatever requires grad
    with torch.enable_grad(), rec:
        out = model(x)
    width = out.shape[-1] if isinstance(out, Tensor) and out.dim() >= 1 else 0
    return sorted(rec.curved), rec.batch_stats, int(width)


def choose_method(method: str, loss: Any, curved: list[str], num_classes: int = 0) -> tuple[str, list[str]]:
    """The `auto` rule (see estimate_traces) and notes on what the chosen method means for this net."""
    notes: list[str] = []
    ce = loss == "cross_entropy"
    if curved:
        what = ", ".join(curved)
        if method in ("exact", "hybrid", "mc_fisher", "mc_fisher_is"):
            notes.append(f"model has {what}: Gauss-Newton approximates the Hessian (trace is the GN trace)")
        else:
            notes.append(f"model has {what}: not piecewise linear, so Hessian-vector products are used")
    if method == "auto":
        if ce and not curved:
            method = "hybrid"
        else:
            method = "hutchinson"
    if method in ("exact", "hybrid", "mc_fisher", "mc_fisher_is") and not ce:
        raise ValueError(f"method={method!r} needs loss='cross_entropy'; use method='hutchinson' for {loss!r}")
    return method, notes
