"""Bit-packed 3/5/6/7-bit weights: the byte layout by brute force, and the in-graph decoder in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from hawq.export._pack import (
    DECODER_DOMAIN,
    PACKED_BITS,
    decoder_function,
    decoder_node,
    pack_fields,
    unpack_fields,
    weight_initializer,
)


def _brute_force_unpack(data: bytes, bits: int, n: int) -> list[int]:
    """Read the bytes as one little-endian bit string; field i is bits [i*b, (i+1)*b), minus 2^(b-1)."""
    stream = "".join(f"{byte:08b}"[::-1] for byte in data)  # bit k of the stream = bit k % 8 of byte k // 8
    return [int(stream[i * bits:(i + 1) * bits][::-1], 2) - (1 << (bits - 1)) for i in range(n)]


def _levels(bits: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    q = (1 << (bits - 1)) - 1
    levels = np.random.default_rng(seed).integers(-q, q + 1, size=shape).astype(np.int8)
    ends = np.array([-q, q], np.int8)[: levels.size]  # both ends of the grid
    levels.reshape(-1)[: len(ends)] = ends
    return levels


@pytest.mark.parametrize("bits", PACKED_BITS)
@pytest.mark.parametrize("shape", [(1,), (5, 3), (4, 2, 3, 3), (16,)])
def test_pack_fields_layout(bits: int, shape: tuple[int, ...]) -> None:
    levels = _levels(bits, shape, seed=bits)
    data = pack_fields(levels, bits)
    n = levels.size
    assert len(data) == -(-n // 8) * bits  # whole groups of eight fields, b bytes each
    assert _brute_force_unpack(data, bits, n) == levels.reshape(-1).tolist()
    np.testing.assert_array_equal(unpack_fields(data, bits, shape), levels)


def test_pack_fields_small_example() -> None:
    # 3 bits: levels 1, -3 -> fields 5 (101), 1 (001) -> bits 001 101 -> 0b00_001_101 = 13, then zeros
    assert pack_fields(np.array([1, -3], np.int8), 3) == bytes([0b00001101, 0, 0])


def test_pack_fields_rejects_off_grid_levels() -> None:
    with pytest.raises(ValueError, match="outside the 3-bit grid"):
        pack_fields(np.array([4], np.int8), 3)


def _decoder_model(levels: np.ndarray, bits: int, opset: int) -> onnx.ModelProto:
    packed = weight_initializer("p", levels, bits)
    call = decoder_node("p", "levels", bits, levels.shape)
    out = helper.make_tensor_value_info("levels", TensorProto.INT8, list(levels.shape))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([call, helper.make_node("Identity", ["x"], ["y"])], "g", [x], [out, y], [packed])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid(DECODER_DOMAIN, 1)],
                              functions=[decoder_function(bits, opset)])
    model.ir_version = 9
    return model


@pytest.mark.parametrize("bits", PACKED_BITS)
@pytest.mark.parametrize("opset", [13, 25])
@pytest.mark.parametrize("level", [ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                   ort.GraphOptimizationLevel.ORT_ENABLE_ALL])
def test_decoder_in_onnxruntime(bits: int, opset: int, level) -> None:
    """Folded at load (default) or run op by op (no optimization), the decoder gives the levels back."""
    levels = _levels(bits, (6, 5, 3, 3), seed=opset + bits)  # 270 values: a partial last group
    model = _decoder_model(levels, bits, opset)
    onnx.checker.check_model(model, full_check=True)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    out = sess.run(["levels"], {"x": np.zeros(1, np.float32)})[0]
    assert out.dtype == np.int8
    np.testing.assert_array_equal(out, levels)


def test_decoder_inlines_for_tools_without_functions() -> None:
    from onnx import inliner

    levels = _levels(5, (4, 4), seed=0)
    flat = inliner.inline_local_functions(_decoder_model(levels, 5, 13))
    assert not flat.functions and all(n.domain == "" for n in flat.graph.node)
    sess = ort.InferenceSession(flat.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(["levels"], {"x": np.zeros(1, np.float32)})[0], levels)
