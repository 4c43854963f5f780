"""Quantization primitives, fake-quant layers, and `quantize_(model, plan)`."""

from hawq.quant.api import (
    LayerBits,
    calibrate_,
    dequantize_,
    first_last_layers,
    quant_layers,
    quantizable_layers,
    quantize_,
    resolve_plan,
)
from hawq.quant.attention import DecomposedMultiheadAttention, decompose_attention_, hidden_linear_layers
from hawq.quant.modules import QuantConv2d, QuantLinear
from hawq.quant.primitives import (
    check_bits,
    fake_quant_activation,
    fake_quant_weight,
    weight_perturbation,
    weight_to_int,
)
from hawq.quant.ranges import calibrate_activations_, set_weight_range_

__all__ = [
    "DecomposedMultiheadAttention",
    "LayerBits",
    "QuantConv2d",
    "QuantLinear",
    "calibrate_",
    "calibrate_activations_",
    "check_bits",
    "decompose_attention_",
    "dequantize_",
    "fake_quant_activation",
    "fake_quant_weight",
    "first_last_layers",
    "hidden_linear_layers",
    "quant_layers",
    "quantizable_layers",
    "quantize_",
    "resolve_plan",
    "set_weight_range_",
    "weight_perturbation",
    "weight_to_int",
]
