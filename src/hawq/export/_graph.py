"""ONNX graph surgery: placeholders become packed QDQ nodes, batch norm folds into convolutions.

Weights: a `hawq::WeightQ` node becomes DequantizeLinear(levels, scales, axis=0) over an INT8 / INT4 / INT2
initializer (1-2 bits in INT2, 3-4 in INT4, 5-8 in INT8; packed two or four per byte, first element in
the low bits, as the ONNX spec stores sub-byte types). No zero point is stored: the grid is symmetric.

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
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hawq.export._view import MARK_DOMAIN, ActMark, WeightMark

# bits -> (container type, container bits, lowest opset with that type in Q/DQ)
WEIGHT_CONTAINERS = {1: (TensorProto.INT2, 2, 25), 2: (TensorProto.INT2, 2, 25)}
WEIGHT_CONTAINERS.update({b: (TensorProto.INT4, 4, 21) for b in (3, 4)})
WEIGHT_CONTAINERS.update({b: (TensorProto.INT8, 8, 13) for b in range(5, 9)})
MIN_OPSET = 13  # per-axis DequantizeLinear


def act_container(w_bits: int | None) -> int:
    """Container of a layer's input grid: UINT8, or UINT16 before INT2 weights (see the docstring)."""
    return TensorProto.UINT16 if w_bits in (1, 2) else TensorProto.UINT8


def type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type)


def mark_opset(mark: WeightMark | ActMark) -> int:
    return WEIGHT_CONTAINERS[mark.w_bits][2] if isinstance(mark, WeightMark) else MIN_OPSET


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Two's-complement `bits`-bit fields, packed 8 // bits per byte, first element in the low bits."""
    per_byte = 8 // bits
    u = (values.astype(np.int16).reshape(-1) & ((1 << bits) - 1)).astype(np.uint8)
    u = np.concatenate([u, np.zeros((-len(u)) % per_byte, np.uint8)]).reshape(-1, per_byte)
    out = np.zeros(len(u), np.uint8)
    for j in range(per_byte):
        out |= u[:, j] << (bits * j)
    return out.tobytes()


def packed_tensor(name: str, values: np.ndarray, elem_type: int, bits: int) -> TensorProto:
    t = TensorProto(name=name, data_type=elem_type, dims=list(values.shape))
    t.raw_data = pack_bits(values, bits)
    return t


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

    def write_back(self) -> None:
        g = self.model.graph
        live = _names_used(self.nodes) | self.outputs
        while True:  # drop nodes nothing reads (the float weights the placeholders replaced, for instance)
            dead = [n for n in self.nodes if not any(o in live for o in n.output if o)]
            if not dead:
                break
            self.nodes = [n for n in self.nodes if n not in dead]
            live = _names_used(self.nodes) | self.outputs
        # Intermediate values get short names (node names keep the module scope): the exporter's names
        # are ~12 KB of a 200 KB ResNet-20.
        keep = self.outputs | {i.name for i in g.input} | set(self.inits)
        has_subgraphs = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                            for n in self.nodes for a in n.attribute)  # they may read outer names
        short: dict[str, str] = {}
        for n in self.nodes:
            n.ClearField("doc_string")
            for i, name in enumerate(n.output):
                if has_subgraphs:
                    break
                if name and name not in keep:
                    short[name] = n.output[i] = f"t{len(short)}"
            for i, name in enumerate(n.input):
                n.input[i] = short.get(name, name)
        g.ClearField("node")
        g.node.extend(self.nodes)
        g.ClearField("initializer")
        g.initializer.extend(t for name, t in self.inits.items() if name in live)
        g.ClearField("value_info")


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
    elem_type, container_bits, _ = WEIGHT_CONTAINERS[mark.w_bits]
    q = gr.add(packed_tensor(f"{mark.fqn}.weight_quantized", levels, elem_type, container_bits))
    s = gr.add(_float(f"{mark.fqn}.weight_scale", scales))
    dq = helper.make_node("DequantizeLinear", [q, s], [node.output[0]], name=f"{mark.fqn}/weight_dq", axis=0)
    return [dq], bn is not None


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


def lower_marks(model: onnx.ModelProto, marks: dict[int, WeightMark | ActMark]) -> tuple[dict[str, bool], int]:
    """Replace the placeholders in place and fold every conv -> batch norm.

    Returns (quantized-weight fqn -> whether a batch norm was folded into it, float convs folded).
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
    gr.write_back()
    kept = [o for o in model.opset_import if o.domain != MARK_DOMAIN]
    model.ClearField("opset_import")
    model.opset_import.extend(kept)
    return folded, n_float_folded
