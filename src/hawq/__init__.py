"""hawq: Hessian-aware mixed-precision quantization (HAWQ-V2, Dong et al., arXiv 1911.03852)."""

from hawq.export import export_onnx
from hawq.models import create_model, list_models
from hawq.quant import LayerBits, calibrate_, decompose_attention_, first_last_layers, quantizable_layers, quantize_

__version__ = "0.1.0"

__all__ = [
    "LayerBits", "calibrate_", "create_model", "decompose_attention_", "export_onnx", "first_last_layers",
    "list_models", "quantizable_layers", "quantize_",
]
