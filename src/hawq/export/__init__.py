"""ONNX export of fake-quantized models: packed integer weights in QDQ form, checked in onnxruntime.

`onnx` and `onnxruntime` are imported only inside the functions, so importing hawq does not need them.
"""

from hawq.export.onnx_export import ExportReport, LayerExport, export_onnx, required_opset
from hawq.export.verify import (
    VerifyReport,
    compare_logits,
    layer_levels,
    ort_session,
    run_onnx,
    size_breakdown,
    verify_onnx,
)

__all__ = [
    "ExportReport",
    "LayerExport",
    "VerifyReport",
    "compare_logits",
    "export_onnx",
    "layer_levels",
    "ort_session",
    "required_opset",
    "run_onnx",
    "size_breakdown",
    "verify_onnx",
]
