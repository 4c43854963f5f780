"""ONNX graph surgery: placeholders become QDQ nodes over compact integer weights, batch norm folds.

Weights: a `hawq::WeightQ` node becomes DequantizeLinear(levels, scales, axis=0) over the layer's integer
levels, stored as `_pack.py` says: INT2 / INT4 / INT8 initializers for 1-2, 4 and 8 bits, bit-packed
UINT8 bytes decoded in the graph (a shared model-local function) for 3, 5, 6 and 7 bits. No zero point
is stored: the grid is symmetric.

Activations: a `hawq::ActQ` node becomes [Clip] -> QuantizeLinear -> DequantizeLinear holding the layer's
unsigned grid 0..2^b-1 (scale, zero point) in a UINT8 container, preceded by a Clip to the grid's range
when the grid is smaller than the container (QuantizeLinear only saturates to its type's range).
Activation containers do not change the file size. The input of a layer with INT2 weights uses UINT16
instead: onnxruntime 1.32 fuses DQ(x) -> Conv/Gemm(DQ(w)) -> Q into QLinearConv/QGemm when input and
output types match, without checking for INT2 weights that those kernels reject (the session then fails
to load); it never fuses 16-bit activations on the CPU. (Dequantizing INT2 by Cast + Mul instead is
worse: it constant-folds them to float and re-quantizes that float weight per tensor, changing the
numbers. The same re-quantization hits a float-weight layer whose input is quantized: keep such layers'
inputs in float too, or expect small differences from PyTorch.)

Batch norm: y = k * (conv(x, W) + b - mean) + beta with k = gamma / sqrt(var + eps). For a quantized
weight W = levels * s we fold k into the DequantizeLinear scale (s' = s * |k|, levels' = levels * sign(k))
and the shift into the bias, so the integer levels are exactly those of the fake-quant model (folding k
into W before quantizing would change them). Float convolutions fold k into their weight.

Size: the graph is written compactly, since a ResNet-20 at ~3 bits is only ~100 KB of weights: values and
initializers get base-36 names ("0", "1", ..., "z", "10"), nodes no names or doc strings, and attributes
equal to their defaults are dropped (a Conv's kernel_shape too: the weight's shape gives it).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hawq.export._pack import (
    DECODER_DOMAIN,
    MIN_FUNCTION_IR,
    MIN_OPSET,
    NATIVE,
    decoder_function,
    decoder_node,
    weight_initializer,
    weight_opset,
)
from hawq.export._view import MARK_DOMAIN, ActMark, WeightMark


def act_container(w_bits: int | None) -> int:
    """Container of a layer's input grid: UINT8, or UINT16 before INT2 weights (see the docstring)."""
    return TensorProto.UINT16 if w_bits in (1, 2) else TensorProto.UINT8


def type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type)


def mark_opset(mark: WeightMark | ActMark) -> int:
    return weight_opset(mark.w_bits) if isinstance(mark, WeightMark) else MIN_OPSET


def _float(name: str, values: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)


class _Graph:
    """Nodes as a Python list and initializers as a dict, written back at the end."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        g = model.graph
        self.nodes = [_copy(n) for n in g.node]
        self.inits = {t.name: _copy(t) for t in g.initializer}
        self.outputs = {o.name for o in g.output}
        self.packed_bits: set[int] = set()  # widths whose decoder function the model needs
        self.weight_names: dict[str, str] = {}  # fqn -> initializer of its levels
        self._bypass_identities()

    def _bypass_identities(self) -> None:
        # The exporter de-duplicates equal parameters through Identity nodes; point consumers at the source.
        alias: dict[str, str] = {}
        kept = []
        for n in self.nodes:
            src = alias.get(n.input[0], n.input[0]) if n.input else ""
            if n.op_type == "Identity" and src in self.inits and n.output[0] not in self.outputs:
                alias[n.output[0]] = src
            else:
                kept.append(n)
        for n in kept:
            for i, name in enumerate(n.input):
                n.input[i] = alias.get(name, name)
        self.nodes = kept

    def consumers(self, name: str) -> list[onnx.NodeProto]:
        return [n for n in self.nodes if name in n.input]

    def value(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def add(self, t: TensorProto) -> str:
        self.inits[t.name] = t
        return t.name

    def bn_after(self, conv: onnx.NodeProto) -> onnx.NodeProto | None:
        """The BatchNormalization that alone consumes `conv`'s output, with constant statistics."""
        if conv.op_type != "Conv" or conv.output[0] in self.outputs:
            return None
        users = self.consumers(conv.output[0])
        if len(users) != 1 or users[0].op_type != "BatchNormalization" or users[0].input[0] != conv.output[0]:
            return None
        bn = users[0]
        if len(bn.output) != 1 or any(name not in self.inits for name in bn.input[1:5]):
            return None
        return bn

    def fold_bn(self, conv: onnx.NodeProto, bn: onnx.NodeProto, n_out: int, prefix: str) -> np.ndarray:
        """Remove `bn`, give `conv` its output and folded bias; return k = gamma / sqrt(var + eps)."""
        gamma, beta, mean, var = (self.value(name).astype(np.float64) for name in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        k = gamma / np.sqrt(var + np.float64(np.float32(eps)))
        bias = self.value(conv.input[2]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] else 0.0
        new_bias = (np.zeros(n_out) + bias - mean) * k + beta
        name = self.add(_float(f"{prefix}.folded_bias", new_bias))
        del conv.input[2:]
        conv.input.append(name)
        conv.output[0] = bn.output[0]
        self.nodes.remove(bn)
        return k

    def fold_float_convs(self) -> int:
        n_folded = 0
        for conv in [n for n in self.nodes if n.op_type == "Conv"]:
            w = self.value(conv.input[1])
            bn = self.bn_after(conv) if w is not None else None
            if bn is None:
                continue
            prefix = conv.input[1].removesuffix(".weight")
            k = self.fold_bn(conv, bn, w.shape[0], prefix)
            conv.input[1] = self.add(_float(f"{prefix}.folded_weight", w * k.reshape(-1, *[1] * (w.ndim - 1))))
            n_folded += 1
        return n_folded

    def write_back(self) -> dict[str, str]:
        """Write nodes and live initializers back, compactly (module docstring); returns old -> new names."""
        g = self.model.graph
        live = _names_used(self.nodes) | self.outputs
        while True:  # drop nodes nothing reads (the float weights the placeholders replaced, for instance)
            dead = [n for n in self.nodes if not any(o in live for o in n.output if o)]
            if not dead:
                break
            self.nodes = [n for n in self.nodes if n not in dead]
            live = _names_used(self.nodes) | self.outputs
        inputs = {i.name for i in g.input}
        has_subgraphs = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                            for n in self.nodes for a in n.attribute)  # they may read outer names
        short: dict[str, str] = {}
        fixed, counter = inputs | self.outputs, 0
        if not has_subgraphs:
            for name in [*(n for n in self.inits if n in live), *(o for n in self.nodes for o in n.output)]:
                if name and name not in fixed and name not in short:
                    while _base36(counter) in fixed:
                        counter += 1
                    short[name], counter = _base36(counter), counter + 1
        for n in self.nodes:
            n.ClearField("doc_string")
            n.ClearField("name")
            _drop_default_attributes(n, self.model, inputs)
            for field in (n.input, n.output):
                for i, name in enumerate(field):
                    field[i] = short.get(name, name)
        g.ClearField("node")
        g.node.extend(self.nodes)
        g.ClearField("initializer")
        for name, t in self.inits.items():
            if name in live:
                t.name = short.get(name, name)
                g.initializer.append(t)
        g.ClearField("value_info")
        g.ClearField("doc_string")
        return short


def _base36(i: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = digits[i % 36]
    while i >= 36:
        i //= 36
        out = digits[i % 36] + out
    return out


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _drop_default_attributes(n: onnx.NodeProto, model: onnx.ModelProto, graph_inputs: set[str]) -> None:
    """Remove attributes equal to the operator's default, and a Conv's kernel_shape (its weight's shape)."""
    if n.domain not in ("", "ai.onnx"):
        return
    try:
        schema = onnx.defs.get_schema(n.op_type, _opset(model))
    except onnx.defs.SchemaError:
        return
    keep = []
    for a in n.attribute:
        value = helper.get_attribute_value(a)
        spec = schema.attributes.get(a.name)
        if spec is not None and spec.default_value.type != onnx.AttributeProto.UNDEFINED:
            if a.type == spec.default_value.type and value == helper.get_attribute_value(spec.default_value):
                continue
        if n.op_type == "Conv" and (
            (a.name in ("dilations", "strides") and all(v == 1 for v in value))
            or (a.name == "pads" and all(v == 0 for v in value))
            or (a.name == "kernel_shape" and n.input[1] not in graph_inputs)
        ):
            continue
        keep.append(a)
    del n.attribute[:]
    n.attribute.extend(keep)


def _copy(msg):
    out = type(msg)()
    out.CopyFrom(msg)
    return out


def _names_used(nodes: list[onnx.NodeProto]) -> set[str]:
    used = set()
    for n in nodes:
        used.update(n.input)
        for a in n.attribute:  # subgraphs may read outer names
            for sub in [a.g, *a.graphs] if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) else []:
                used |= _names_used(list(sub.node))
    return used


def _weight_nodes(gr: _Graph, node: onnx.NodeProto, mark: WeightMark) -> tuple[list[onnx.NodeProto], bool]:
    levels = mark.levels.numpy().astype(np.int8)
    scales = mark.scales.numpy().astype(np.float64)
    users = gr.consumers(node.output[0])
    conv = users[0] if len(users) == 1 and users[0].op_type == "Conv" else None
    bn = gr.bn_after(conv) if conv is not None and conv.input[1] == node.output[0] else None
    if bn is not None:
        k = gr.fold_bn(conv, bn, levels.shape[0], mark.fqn)
        sign = np.where(k < 0, -1, 1).astype(np.int8).reshape(-1, *[1] * (levels.ndim - 1))
        levels, scales = levels * sign, scales * np.abs(k)
    q = gr.add(weight_initializer(f"{mark.fqn}.weight_quantized", levels, mark.w_bits))
    s = gr.add(_float(f"{mark.fqn}.weight_scale", scales))
    nodes = []
    if mark.w_bits not in NATIVE:
        nodes.append(decoder_node(q, f"{mark.fqn}/weight_levels", mark.w_bits, levels.shape))
        gr.packed_bits.add(mark.w_bits)
        q = nodes[-1].output[0]
    nodes.append(helper.make_node("DequantizeLinear", [q, s], [node.output[0]], axis=0))
    gr.weight_names[mark.fqn] = f"{mark.fqn}.weight_quantized"
    return nodes, bn is not None


def _act_nodes(gr: _Graph, node: onnx.NodeProto, mark: ActMark) -> list[onnx.NodeProto]:
    x, prefix, levels = node.input[0], mark.fqn, 2**mark.a_bits - 1
    container = act_container(mark.w_bits)
    nodes = []
    if levels < (255 if container == TensorProto.UINT8 else 65535):
        lo = gr.add(_float(f"{prefix}.input_clip_min", np.float32((0 - mark.zero_point) * mark.scale)))
        hi = gr.add(_float(f"{prefix}.input_clip_max", np.float32((levels - mark.zero_point) * mark.scale)))
        nodes.append(helper.make_node("Clip", [x, lo, hi], [f"{prefix}/input_clipped"], name=f"{prefix}/input_clip"))
        x = nodes[-1].output[0]
    s = gr.add(_float(f"{prefix}.input_scale", np.float32(mark.scale)))
    dtype = np.uint8 if container == TensorProto.UINT8 else np.uint16
    z = gr.add(numpy_helper.from_array(np.array(mark.zero_point, dtype), f"{prefix}.input_zero_point"))
    nodes.append(helper.make_node("QuantizeLinear", [x, s, z], [f"{prefix}/input_q"], name=f"{prefix}/input_q"))
    nodes.append(helper.make_node("DequantizeLinear", [f"{prefix}/input_q", s, z], [node.output[0]],
                                  name=f"{prefix}/input_dq"))
    return nodes


def lower_marks(
    model: onnx.ModelProto, marks: dict[int, WeightMark | ActMark]
) -> tuple[dict[str, bool], int, dict[str, str]]:
    """Replace the placeholders in place and fold every conv -> batch norm.

    Returns (quantized-weight fqn -> whether a batch norm was folded into it, float convs folded,
    quantized-weight fqn -> name of the initializer holding its levels).
    """
    gr = _Graph(model)
    folded: dict[str, bool] = {}
    out: list[onnx.NodeProto] = []
    for node in list(gr.nodes):
        if node not in gr.nodes:  # a batch norm folded away by an earlier placeholder
            continue
        if node.domain != MARK_DOMAIN:
            out.append(node)
            continue
        mark = marks[next(a.i for a in node.attribute if a.name == "tag")]
        if isinstance(mark, WeightMark):
            nodes, folded[mark.fqn] = _weight_nodes(gr, node, mark)
        else:
            nodes = _act_nodes(gr, node, mark)
        out.extend(nodes)
    gr.nodes = out
    n_float_folded = gr.fold_float_convs()
    short = gr.write_back()
    opset = _opset(model)
    kept = [o for o in model.opset_import if o.domain not in (MARK_DOMAIN, DECODER_DOMAIN)]
    model.ClearField("opset_import")
    model.opset_import.extend(kept)
    if gr.packed_bits:
        model.opset_import.append(helper.make_opsetid(DECODER_DOMAIN, 1))
        model.functions.extend(decoder_function(b, opset) for b in sorted(gr.packed_bits))
        model.ir_version = max(model.ir_version, MIN_FUNCTION_IR)
    return folded, n_float_folded, {fqn: short.get(name, name) for fqn, name in gr.weight_names.items()}
