"""Fake-quantized Conv2d and Linear: the float layer with its weight and input passed through Q_b.

Built with `from_float` (sharing the float layer's parameters) and turned back with `to_float`. Each holds
its weight bits (`w_bits`, None = float) and input activation bits (`a_bits`, None = float), and a running
min/max of its input observed while `calibrating` is True.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hawq.quant.primitives import check_bits, fake_quant_activation, fake_quant_weight


class _QuantMixin:
    w_bits: int | None
    a_bits: int | None

    def _init_quant(self, w_bits: int | None, a_bits: int | None) -> None:
        self.w_bits = None if w_bits is None else check_bits(w_bits)
        self.a_bits = None if a_bits is None else check_bits(a_bits)
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
        return w if self.w_bits is None else fake_quant_weight(w, self.w_bits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, w_bits={self.w_bits}, a_bits={self.a_bits}"


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """nn.Conv2d whose weight and input are fake-quantized."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits: int | None, a_bits: int | None = None) -> QuantConv2d:
        q = cls.__new__(cls)
        q.__dict__.update(conv.__dict__)  # same parameters, hooks and hyper-parameters
        q._parameters = dict(conv._parameters)
        q._buffers = dict(conv._buffers)
        q._modules = dict(conv._modules)
        q._init_quant(w_bits, a_bits)
        return q

    def to_float(self) -> nn.Conv2d:
        conv = nn.Conv2d.__new__(nn.Conv2d)
        conv.__dict__.update(self.__dict__)
        conv._parameters = dict(self._parameters)
        conv._buffers = {k: v for k, v in self._buffers.items() if k not in ("act_min", "act_max")}
        for k in ("w_bits", "a_bits", "calibrating"):
            conv.__dict__.pop(k, None)
        return conv

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quant_input(x), self.quant_weight(), self.bias)


class QuantLinear(_QuantMixin, nn.Linear):
    """nn.Linear whose weight and input are fake-quantized."""

    @classmethod
    def from_float(cls, lin: nn.Linear, w_bits: int | None, a_bits: int | None = None) -> QuantLinear:
        q = cls.__new__(cls)
        q.__dict__.update(lin.__dict__)
        q._parameters = dict(lin._parameters)
        q._buffers = dict(lin._buffers)
        q._modules = dict(lin._modules)
        q._init_quant(w_bits, a_bits)
        return q

    def to_float(self) -> nn.Linear:
        lin = nn.Linear.__new__(nn.Linear)
        lin.__dict__.update(self.__dict__)
        lin._parameters = dict(self._parameters)
        lin._buffers = {k: v for k, v in self._buffers.items() if k not in ("act_min", "act_max")}
        for k in ("w_bits", "a_bits", "calibrating"):
            lin.__dict__.pop(k, None)
        return lin

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quant_input(x), self.quant_weight(), self.bias)


QUANT_MODULES: dict[type, type] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
