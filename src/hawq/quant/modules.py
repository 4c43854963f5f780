"""Fake-quantized Conv2d and Linear: the float layer with its weight and input passed through Q_b.

Built with `from_float` (sharing the float layer's parameters) and turned back with `to_float`. Each holds
its weight bits (`w_bits`, None = float), how its weight range is chosen (`w_range`: "mse", the clip ratio
that minimises ||Q(W) - W||^2 per channel, or "max"), its input activation bits (`a_bits`, None = float),
and a running min/max of its input observed while `calibrating` is True.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hawq.quant.primitives import check_bits, check_weight_range, fake_quant_activation, fake_quant_weight

# Keep the quantized weight between gradient-free forwards (`quant_weight`); bench/weight_cache.py turns it off
# to measure what it saves.
CACHE_QUANTIZED_WEIGHTS = True


class _QuantMixin:
    w_bits: int | None
    a_bits: int | None
    w_range: str
    float_cls: type[nn.Module]

    def _init_quant(self, w_bits: int | None, a_bits: int | None, w_range: str = "mse") -> None:
        self.w_bits = None if w_bits is None else check_bits(w_bits)
        self.a_bits = None if a_bits is None else check_bits(a_bits)
        self.w_range = check_weight_range(w_range)
        self.calibrating = False
        self.register_buffer("act_min", torch.tensor(float("inf")))
        self.register_buffer("act_max", torch.tensor(float("-inf")))

    @property
    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.act_min)) and bool(torch.isfinite(self.act_max))

    def quant_input(self, x: Tensor) -> Tensor:
        if self.calibrating:
            with torch.no_grad():
                self.act_min.copy_(torch.minimum(self.act_min, x.min()))
                self.act_max.copy_(torch.maximum(self.act_max, x.max()))
            return x
        if self.a_bits is None:
            return x
        if not self.calibrated:
            raise ValueError(
                f"layer quantizes its input at {self.a_bits} bits but has no activation range: "
                "run hawq.calibrate_(model, batches) first"
            )
        return fake_quant_activation(x, float(self.act_min), float(self.act_max), self.a_bits)

    def quant_weight(self) -> Tensor:
        w = self.weight
        if self.w_bits is None:
            return w
        if torch.is_grad_enabled() or not CACHE_QUANTIZED_WEIGHTS:
            return fake_quant_weight(w, self.w_bits, self.w_range)
        # Without gradients (evaluation, calibration, batch-norm re-estimation, export checks) the quantized
        # weight is kept until the weight changes: every in-place change (optimizer step, load_state_dict,
        # copy_) bumps its version counter, and a new tensor has another storage. The clip search then runs
        # once per weight, not once per batch (bench/weight_cache.py).
        key = (w.data_ptr(), w._version, w.dtype, w.device, self.w_bits, self.w_range)
        cached = self.__dict__.get("_wq_cache")
        if cached is None or cached[0] != key:
            cached = (key, fake_quant_weight(w, self.w_bits, self.w_range))
            self.__dict__["_wq_cache"] = cached
        return cached[1]

    @classmethod
    def from_float(cls, layer: nn.Module, w_bits: int | None, a_bits: int | None = None, w_range: str = "mse"):
        """The fake-quant twin of `layer`, sharing its parameters, hooks and hyper-parameters."""
        q = cls.__new__(cls)
        q.__dict__.update(layer.__dict__)
        q._parameters = dict(layer._parameters)
        q._buffers = dict(layer._buffers)
        q._modules = dict(layer._modules)
        q._init_quant(w_bits, a_bits, w_range)
        return q

    def to_float(self) -> nn.Module:
        """The float layer back, sharing the parameters (the activation range is dropped)."""
        layer = self.float_cls.__new__(self.float_cls)
        layer.__dict__.update(self.__dict__)
        layer._parameters = dict(self._parameters)
        layer._buffers = {k: v for k, v in self._buffers.items() if k not in ("act_min", "act_max")}
        for k in ("w_bits", "a_bits", "w_range", "calibrating", "_wq_cache"):
            layer.__dict__.pop(k, None)
        return layer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, w_bits={self.w_bits}, a_bits={self.a_bits}, w_range={self.w_range}"


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """nn.Conv2d whose weight and input are fake-quantized."""

    float_cls = nn.Conv2d

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quant_input(x), self.quant_weight(), self.bias)


class QuantLinear(_QuantMixin, nn.Linear):
    """nn.Linear whose weight and input are fake-quantized."""

    float_cls = nn.Linear

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quant_input(x), self.quant_weight(), self.bias)


QUANT_MODULES: dict[type, type] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
