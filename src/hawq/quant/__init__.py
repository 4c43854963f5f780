"""Quantization primitives, fake-quant layers, and `quantize_(model, plan)`."""

from hawq.quant.api import (
    LayerBits,
    calibrate_,
    dequantize_,
    quant_layers,
    quantizable_layers,
    quantize_,
    resolve_plan,
)
from hawq.quant.modules import QuantConv2d, QuantLinear
from hawq.quant.primitives import (
    check_bits,
    fake_quant_activation,
    fake_quant_weight,
    weight_perturbation,
    weight_to_int,
)

__all__ = [
    "LayerBits",
    "QuantConv2d",
    "QuantLinear",
    "calibrate_",
    "check_bits",
    "dequantize_",
    "fake_quant_activation",
    "fake_quant_weight",
    "quant_layers",
    "quantizable_layers",
    "quantize_",
    "resolve_plan",
    "weight_perturbation",
    "weight_to_int",
]
