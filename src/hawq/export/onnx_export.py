"""`export_onnx`: a fake-quantized, calibrated model becomes a QDQ ONNX model with packed integer weights.

The model is traced by PyTorch's TorchScript ONNX exporter through its export view (`_view.py`), whose
placeholders are then lowered to DequantizeLinear over INT8 / INT4 / INT2 initializers or bit-packed
3/5/6/7-bit bytes with an in-graph decoder (`_pack.py`), and to [Clip] -> QuantizeLinear ->
DequantizeLinear on layer inputs (`_graph.py`); batch norm is folded into the preceding convolution. The
opset is the lowest that holds the plan's weight types: 13 when no weight has 1, 2 or 4 bits, 21 when
one has 4 bits (INT4), 25 when one has 1-2 bits (INT2); or the lowest from which the exporter has every
operator of the model, if that is higher (a causal mask's `triu`: 14). `onnx.checker` runs on the result, and
onnxruntime's logits on the example input are compared with the PyTorch model's.

The file's metadata `hawq.layers` maps every quantized layer's fqn to [n_params, w_bits, a_bits, name of
the initializer holding its weight levels] (compact JSON; `layer_levels` in verify.py reads it back).
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hawq.artifacts import _atomic_write_bytes
from hawq.export._view import ActMark, WeightMark, export_view
from hawq.quant import QuantConv2d, QuantLinear

METADATA_KEY = "hawq.layers"
_EXPORTER_MAX_OPSET = 20  # trace at min(opset, this), then onnx.version_converter


@dataclass(frozen=True)
class LayerExport:
    """How one quantized layer was stored: bit widths and the ONNX container types holding them."""

    fqn: str
    n_params: int
    w_bits: int | None
    a_bits: int | None
    w_type: str | None  # "INT2" (1-2 bits), "INT4", "INT8", or "PACKED3" / 5 / 6 / 7 (decoded in the graph)
    a_type: str | None  # "UINT8", or "UINT16" before INT2 weights (see _graph.py)
    bn_folded: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerExport:
        return cls(**d)


@dataclass(frozen=True)
class ExportReport:
    path: str
    opset: int
    file_size_bytes: int
    layers: tuple[LayerExport, ...]
    n_float_bn_folded: int  # batch norms hawq folded into float convolutions (the exporter folds most)
    example_max_abs_diff: float  # onnxruntime vs PyTorch logits on the example input
    example_top1_agreement: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [layer.to_dict() for layer in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExportReport:
        return cls(**{**d, "layers": tuple(LayerExport.from_dict(x) for x in d["layers"])})


def required_opset(marks: dict[int, WeightMark | ActMark]) -> tuple[int, str | None]:
    """The lowest opset holding every mark's container type, and the layer that needs it."""
    from hawq.export._graph import mark_opset
    from hawq.export._pack import MIN_OPSET

    best, who = MIN_OPSET, None
    for mark in marks.values():
        if mark_opset(mark) > best:
            best, who = mark_opset(mark), mark.fqn
    return best, who


def _trace(view: nn.Module, example_input: Tensor, opset: int) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            view, (example_input,), buf, dynamo=False, opset_version=opset, do_constant_folding=True,
            autograd_inlining=False,  # else the marks' forward is traced as a subgraph, which fails
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return buf.getvalue()


def _trace_from(view: nn.Module, example_input: Tensor, opset: int, search: bool) -> tuple[bytes, int]:
    """Trace at `opset`; with `search` (no opset asked for), an operator the exporter has only from a later opset
    (`triu` of a causal attention mask: 14) moves the trace up one opset at a time, to the exporter's maximum."""
    from torch.onnx.errors import UnsupportedOperatorError

    while True:
        try:
            return _trace(view, example_input, opset), opset
        except UnsupportedOperatorError:
            if not search or opset >= _EXPORTER_MAX_OPSET:
                raise
            opset += 1


def _failing_layer(view: nn.Module, example_input: Tensor, opset: int) -> tuple[str, str] | None:
    """(fqn, type) of the innermost module that cannot be traced to ONNX on its own, if one is found."""
    from hawq.export._view import _MarkedLayer

    inputs: dict[str, tuple] = {}
    names = {m: n for n, m in view.named_modules()}
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.setdefault(names[mod], args))
             for n, m in view.named_modules() if n]
    try:
        with torch.no_grad():
            view(example_input)
    except Exception:
        pass
    finally:
        for h in hooks:
            h.remove()
    failing = []
    for fqn, args in inputs.items():  # execution order
        mod = view.get_submodule(fqn)
        if not args or not all(isinstance(a, Tensor) for a in args):
            continue
        try:
            buf = io.BytesIO()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(mod, args, buf, dynamo=False, opset_version=opset)
        except Exception:
            failing.append(fqn)
    inner = [f for f in failing if not any(g.startswith(f + ".") for g in failing)]
    if not inner:
        return None
    fqn = inner[0]
    mod = view.get_submodule(fqn)
    if isinstance(mod, _MarkedLayer):
        mod = mod.layer
    if fqn.endswith(".layer") and isinstance(view.get_submodule(fqn.rpartition(".")[0]), _MarkedLayer):
        fqn = fqn.rpartition(".")[0]
    return fqn, type(mod).__name__


def export_onnx(
    model: nn.Module, path: str | Path, example_input: Tensor, *, opset: int | None = None
) -> ExportReport:
    """Export a model quantized with `hawq.quantize_` and calibrated with `hawq.calibrate_` to ONNX.

    `example_input` (B, ...) fixes every dimension but the batch. `opset` defaults to the lowest that
    holds the plan's types; a lower one is a ValueError naming a layer that needs more.
    """
    import onnx
    from onnx import version_converter

    from hawq.export._graph import act_container, lower_marks, type_name
    from hawq.export._pack import weight_type
    from hawq.export.verify import compare_logits, run_onnx

    view, marks = export_view(model)
    need, who = required_opset(marks)
    search = opset is None
    if opset is None:
        opset = need
    elif opset < need:
        raise ValueError(f"layer {who!r} needs ONNX opset {need} for its bit widths; pass opset >= {need}")
    base = min(opset, _EXPORTER_MAX_OPSET)
    try:
        data, base = _trace_from(view, example_input, base, search)
        proto = onnx.load_from_string(data)
        opset = max(opset, base)
    except Exception as e:
        bad = _failing_layer(view, example_input, base)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if bad is None:
            raise ValueError(f"the model cannot be exported to ONNX (outside any one layer): {reason}") from e
        raise ValueError(
            f"layer {bad[0]!r} ({bad[1]}) cannot be exported to ONNX opset {base}: {reason}. "
            "Replace it with ONNX-exportable operations or leave it out of the exported model"
        ) from e
    if opset > base:
        proto = version_converter.convert_version(proto, opset)
    folded, n_float_folded, weight_names = lower_marks(proto, marks)

    layers = []
    for fqn, m in model.named_modules():
        if type(m) not in (QuantConv2d, QuantLinear) or (m.w_bits is None and m.a_bits is None):
            continue
        layers.append(LayerExport(
            fqn=fqn, n_params=m.weight.numel(), w_bits=m.w_bits, a_bits=m.a_bits,
            w_type=None if m.w_bits is None else weight_type(m.w_bits),
            a_type=None if m.a_bits is None else type_name(act_container(m.w_bits)),
            bn_folded=folded.get(fqn, False),
        ))
    entry = proto.metadata_props.add()
    meta = {x.fqn: [x.n_params, x.w_bits, x.a_bits, weight_names.get(x.fqn)] for x in layers}
    entry.key, entry.value = METADATA_KEY, json.dumps(meta, separators=(",", ":"))
    proto.producer_name = "hawq"
    proto.graph.name = "hawq"
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    path = Path(path)
    _atomic_write_bytes(path, data)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(example_input).float().numpy()
    finally:
        model.train(was_training)
    diff = compare_logits(ref, run_onnx(data, example_input.numpy()))
    return ExportReport(
        path=str(path), opset=opset, file_size_bytes=len(data), layers=tuple(layers),
        n_float_bn_folded=n_float_folded, example_max_abs_diff=diff["max_abs_diff"],
        example_top1_agreement=diff["top1_agreement"],
    )
