"""How integer weight levels are stored: native ONNX integer types, or bit-packed with an in-graph decoder.

Widths with an ONNX type keep it: 1-2 bits in INT2, 4 bits in INT4, 8 bits in INT8 (packed two or four
per byte, first element in the low bits, as the ONNX spec stores sub-byte types), read by
DequantizeLinear directly.

Widths without one (3, 5, 6, 7 bits) are bit-packed into a UINT8 initializer: each level l of a b-bit
grid (|l| <= 2^(b-1) - 1) is stored as the unsigned field u = l + 2^(b-1); eight fields form one
little-endian 8b-bit group, field j in bits [j*b, (j+1)*b), and the group's b bytes follow each other,
low byte first; a last partial group is padded with zero fields. A model-local ONNX function
`hawq.Unpack<b>` (one per width, shared by every layer of that width, attribute `shape`) turns the bytes
back into the INT8 levels that DequantizeLinear reads, with integer ops only:

    bytes (G*b,) -> (G, b) -> int64 @ [1, 256, ..., 256^(b-1)]      one int64 per group (< 2^56)
    -> Div [1, 2^b, ..., 2^(7b)], Mod 2^b -> (G*8,) fields -> Slice(0, prod(shape)) -> Reshape(shape)
    -> Sub 2^(b-1) -> Cast INT8

All of it is in opset 13, so a plan whose weights are all 3, 5, 6, 7 or 8 bits stays at opset 13, and
onnxruntime folds the decoder into a constant INT8 tensor when the session loads (nothing runs per
inference). Tools that do not read model-local functions can inline them first
(`onnx.inliner.inline_local_functions`).
"""

from __future__ import annotations

import numpy as np
from onnx import AttributeProto, FunctionProto, NodeProto, TensorProto, helper, numpy_helper

DECODER_DOMAIN = "hawq"
DECODER_ATTR = "shape"
MIN_OPSET = 13  # per-axis DequantizeLinear; everything the decoder uses
MIN_FUNCTION_IR = 8  # model-local functions

# bits -> (ONNX type that DequantizeLinear reads, bits per stored field, lowest opset with that type)
NATIVE = {1: (TensorProto.INT2, 2, 25), 2: (TensorProto.INT2, 2, 25), 4: (TensorProto.INT4, 4, 21),
          8: (TensorProto.INT8, 8, MIN_OPSET)}
PACKED_BITS = (3, 5, 6, 7)


def weight_opset(bits: int) -> int:
    """Lowest opset that stores `bits`-bit weights."""
    return NATIVE[bits][2] if bits in NATIVE else MIN_OPSET


def weight_type(bits: int) -> str:
    """How `bits`-bit levels are stored: "INT2" / "INT4" / "INT8", or "PACKED3" etc. (UINT8 bytes, decoded)."""
    return TensorProto.DataType.Name(NATIVE[bits][0]) if bits in NATIVE else f"PACKED{bits}"


def decoder_name(bits: int) -> str:
    return f"Unpack{bits}"


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Two's-complement `bits`-bit fields (bits in 2, 4, 8), 8 // bits per byte, first element in the low bits."""
    per_byte = 8 // bits
    u = (values.astype(np.int16).reshape(-1) & ((1 << bits) - 1)).astype(np.uint8)
    u = np.concatenate([u, np.zeros((-len(u)) % per_byte, np.uint8)]).reshape(-1, per_byte)
    out = np.zeros(len(u), np.uint8)
    for j in range(per_byte):
        out |= u[:, j] << (bits * j)
    return out.tobytes()


def pack_fields(values: np.ndarray, bits: int) -> bytes:
    """Levels of a `bits`-bit symmetric grid as offset fields, eight per `bits` bytes (module docstring)."""
    u = values.astype(np.int64).reshape(-1) + (1 << (bits - 1))
    if len(u) and (u.min() < 0 or u.max() >= 1 << bits):
        raise ValueError(f"levels outside the {bits}-bit grid: quantize the weight with hawq.quantize_")
    u = np.concatenate([u, np.zeros((-len(u)) % 8, np.int64)]).reshape(-1, 8).astype(np.uint64)
    group = np.zeros(len(u), np.uint64)
    for j in range(8):
        group |= u[:, j] << np.uint64(j * bits)
    out = np.stack([(group >> np.uint64(8 * k)) & np.uint64(0xFF) for k in range(bits)], axis=1)
    return out.astype(np.uint8).tobytes()


def unpack_fields(data: bytes, bits: int, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `pack_fields` in numpy: the int8 levels, shaped `shape`."""
    b = np.frombuffer(data, np.uint8).reshape(-1, bits).astype(np.uint64)
    group = sum(b[:, k] << np.uint64(8 * k) for k in range(bits))
    fields = np.stack([(group >> np.uint64(j * bits)) & np.uint64((1 << bits) - 1) for j in range(8)], axis=1)
    n = int(np.prod(shape))
    return (fields.reshape(-1)[:n].astype(np.int64) - (1 << (bits - 1))).astype(np.int8).reshape(shape)


def weight_initializer(name: str, levels: np.ndarray, bits: int) -> TensorProto:
    """A native INT8/INT4/INT2 tensor of the weight's shape, or the packed UINT8 bytes (1-D)."""
    if bits in NATIVE:
        elem_type, field_bits, _ = NATIVE[bits]
        t = TensorProto(name=name, data_type=elem_type, dims=list(levels.shape))
        t.raw_data = pack_bits(levels, field_bits)
        return t
    data = pack_fields(levels, bits)
    t = TensorProto(name=name, data_type=TensorProto.UINT8, dims=[len(data)])
    t.raw_data = data
    return t


def decoder_node(packed: str, out: str, bits: int, shape: tuple[int, ...]) -> NodeProto:
    """The call of `hawq.Unpack<bits>` turning the packed bytes `packed` into INT8 levels `out`."""
    return helper.make_node(decoder_name(bits), [packed], [out], domain=DECODER_DOMAIN,
                            **{DECODER_ATTR: list(shape)})


def _const(out: str, values) -> NodeProto:
    return helper.make_node("Constant", [], [out], value=numpy_helper.from_array(np.asarray(values, np.int64)))


def decoder_function(bits: int, opset: int) -> FunctionProto:
    """`hawq.Unpack<bits>(bytes) -> int8 levels`, its `shape` attribute the weight's shape."""
    shape = helper.make_node("Constant", [], ["shape"])
    ref = AttributeProto(name="value_ints", type=AttributeProto.INTS, ref_attr_name=DECODER_ATTR)
    shape.attribute.append(ref)
    nodes = [
        _const("rows", [-1, bits]),
        helper.make_node("Reshape", ["bytes", "rows"], ["by_group"]),  # (G, b)
        helper.make_node("Cast", ["by_group"], ["wide"], to=TensorProto.INT64),
        _const("byte_weights", [[256**k] for k in range(bits)]),
        helper.make_node("MatMul", ["wide", "byte_weights"], ["group"]),  # (G, 1)
        _const("field_weights", [[2 ** (j * bits) for j in range(8)]]),
        helper.make_node("Div", ["group", "field_weights"], ["shifted"]),  # (G, 8)
        _const("modulus", 1 << bits),
        helper.make_node("Mod", ["shifted", "modulus"], ["fields"]),
        _const("flat", [-1]),
        helper.make_node("Reshape", ["fields", "flat"], ["all_fields"]),
        shape,
        helper.make_node("ReduceProd", ["shape"], ["numel"]),  # no axes: all, keepdims -> (1,)
        _const("zero", [0]),
        helper.make_node("Slice", ["all_fields", "zero", "numel"], ["used"]),
        helper.make_node("Reshape", ["used", "shape"], ["shaped"]),
        _const("offset", 1 << (bits - 1)),
        helper.make_node("Sub", ["shaped", "offset"], ["wide_levels"]),
        helper.make_node("Cast", ["wide_levels"], ["levels"], to=TensorProto.INT8),
    ]
    return helper.make_function(DECODER_DOMAIN, decoder_name(bits), ["bytes"], ["levels"], nodes,
                                [helper.make_opsetid("", opset)], attributes=[DECODER_ATTR])
