"""The export view of a fake-quantized model: each quantized layer marks its weight and input.

`export_view(model)` returns a copy of the model in which every QuantConv2d / QuantLinear is replaced by a
layer computing exactly the same fake-quant forward, but through two autograd Functions whose ONNX
symbolic is a placeholder node (`hawq::WeightQ`, `hawq::ActQ`) tagged with an integer. The ONNX graph
surgery (`_graph.py`) later replaces each placeholder by DequantizeLinear (weights) or
[Clip] -> QuantizeLinear -> DequantizeLinear (activations) with the layer's integer levels and scales.
Marking the tensors, rather than matching parameter names, survives the exporter's renaming and
de-duplication of initializers and any wiring the model's forward has.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hawq.quant import QuantConv2d, QuantLinear, fake_quant_activation, weight_to_int
from hawq.quant.primitives import activation_qparams

MARK_DOMAIN = "hawq"


@dataclass(frozen=True)
class WeightMark:
    """A quantized weight: integer levels (int8 tensor, the weight's shape) and per-channel scales."""

    fqn: str
    w_bits: int
    levels: Tensor  # (out, ...) int8
    scales: Tensor  # (out,) float32


@dataclass(frozen=True)
class ActMark:
    """A quantized layer input: the unsigned grid 0..2^a_bits-1 with its scale and zero point."""

    fqn: str
    a_bits: int
    scale: float
    zero_point: int
    w_bits: int | None  # the layer's weight bits: the container of its input depends on them


class _WeightQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, tag: int, layer: _MarkedLayer) -> Tensor:
        # the mark's levels * scales, computed once: recomputing the (clip-searched) scales here would have
        # the tracer record every op of the search, ~1 s per layer
        return layer.dequantized_weight.to(w.dtype).clone()

    @staticmethod
    def symbolic(g, w, tag: int, layer: _MarkedLayer):
        out = g.op(f"{MARK_DOMAIN}::WeightQ", w, tag_i=tag)
        out.setType(w.type())
        return out


class _ActQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, tag: int, lo: float, hi: float, bits: int) -> Tensor:
        return fake_quant_activation(x, lo, hi, bits)

    @staticmethod
    def symbolic(g, x, tag: int, lo: float, hi: float, bits: int):
        out = g.op(f"{MARK_DOMAIN}::ActQ", x, tag_i=tag)
        out.setType(x.type())
        return out


class _MarkedLayer(nn.Module):
    """Replaces one QuantConv2d / QuantLinear; same parameters, same forward, marked for ONNX."""

    def __init__(self, layer: QuantConv2d | QuantLinear, w_tag: int | None, a_tag: int | None,
                 weight_mark: WeightMark | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.w_tag, self.a_tag = w_tag, a_tag
        self.dequantized_weight = None if weight_mark is None else (
            weight_mark.levels.float() * weight_mark.scales.reshape(-1, *([1] * (weight_mark.levels.dim() - 1))))
        # python numbers, fixed now: reading the range buffers while tracing would record ops on them
        self.act_range = (float(layer.act_min), float(layer.act_max)) if a_tag is not None else (0.0, 0.0)

    def forward(self, x: Tensor) -> Tensor:
        m = self.layer
        if self.a_tag is not None:
            x = _ActQ.apply(x, self.a_tag, *self.act_range, m.a_bits)
        w = m.weight if self.w_tag is None else _WeightQ.apply(m.weight, self.w_tag, self)
        if isinstance(m, QuantConv2d):
            return m._conv_forward(x, w, m.bias)
        if x.dim() > 2:
            # (..., in) -> (N, in) -> Gemm -> (..., out). Traced as is, a 3-D linear becomes
            # Transpose(DQ(w)) -> MatMul, which onnxruntime 1.32 fuses with the input's Q/DQ into
            # MatMulIntegerToFloat and gets wrong for INT4 weights (0.1 off on logits in a tiny transformer).
            lead = x.shape[:-1]
            return F.linear(x.reshape(-1, x.shape[-1]), w, m.bias).reshape(*lead, w.shape[0])
        return F.linear(x, w, m.bias)


def check_exportable(model: nn.Module) -> None:
    """Raise ValueError naming the first layer export cannot represent faithfully."""
    for fqn, m in model.named_modules():
        quantish = isinstance(m, (QuantConv2d, QuantLinear)) or hasattr(m, "w_bits") or hasattr(m, "a_bits")
        if quantish and type(m) not in (QuantConv2d, QuantLinear):
            raise ValueError(
                f"layer {fqn!r} is a {type(m).__name__}, a quantized layer type the ONNX export does not "
                "know: quantize with hawq.quantize_ (QuantConv2d / QuantLinear) or leave the layer in float"
            )
        if type(m) in (QuantConv2d, QuantLinear) and m.a_bits is not None and not m.calibrated:
            raise ValueError(
                f"layer {fqn!r} quantizes its input at {m.a_bits} bits but has no activation range: "
                "run hawq.calibrate_(model, batches) before exporting"
            )


def _set_module(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def export_view(model: nn.Module) -> tuple[nn.Module, dict[int, WeightMark | ActMark]]:
    """A marked copy of `model` (eval mode) and the marks' contents by tag."""
    check_exportable(model)
    view = copy.deepcopy(model).eval().requires_grad_(False)  # the tracer mis-handles marks on grad paths
    marks: dict[int, WeightMark | ActMark] = {}
    layers = [(n, m) for n, m in view.named_modules() if type(m) in (QuantConv2d, QuantLinear)]
    if any(n == "" for n, _ in layers):
        raise ValueError("the model itself is a single quantized layer: wrap it in nn.Sequential to export it")
    for fqn, m in layers:
        w_tag = a_tag = None
        if m.w_bits is not None:
            levels, scales = weight_to_int(m.weight.detach().float(), m.w_bits, m.w_range)  # the clipped scales
            w_tag = len(marks)
            marks[w_tag] = WeightMark(fqn, m.w_bits, levels, scales.float())
        if m.a_bits is not None:
            scale, zero_point, _, _ = activation_qparams(float(m.act_min), float(m.act_max), m.a_bits)
            a_tag = len(marks)
            marks[a_tag] = ActMark(fqn, m.a_bits, scale, zero_point, m.w_bits)
        _set_module(view, fqn, _MarkedLayer(m, w_tag, a_tag, None if w_tag is None else marks[w_tag]))
    return view, marks
