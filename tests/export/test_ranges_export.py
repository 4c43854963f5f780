"""The ONNX file of a clipped plan carries the clipped scales and matches PyTorch exactly."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

import hawq
from hawq.export import export_onnx, layer_levels
from hawq.quant.ranges import set_weight_range_


def test_clipped_plan_exports_its_scales_and_matches(quantized, tmp_path):
    model, x = quantized("tiny_cnn", {"conv2": {"w_bits": 2, "a_bits": 4}, "fc": {"w_bits": 3, "a_bits": 8}})
    w = model.conv2.weight.detach()
    clipped = hawq.quant.weight_to_int(w, 2, "mse")[1]
    assert bool((clipped < hawq.quant.weight_to_int(w, 2, "max")[1] - 1e-9).any())  # clipping is in effect
    export_onnx(model, tmp_path / "m.onnx", x[:2])
    np.testing.assert_array_equal(layer_levels(tmp_path / "m.onnx")["conv2"][1], clipped.numpy())
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    with torch.no_grad():
        ref = model(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_max_range_layer_exports_max_scales(quantized, tmp_path):
    model, x = quantized("tiny_cnn", {"conv2": 2})
    set_weight_range_(model, "max")
    export_onnx(model, tmp_path / "m.onnx", x[:2])
    expected = hawq.quant.weight_to_int(model.conv2.weight.detach(), 2, "max")[1]
    np.testing.assert_array_equal(layer_levels(tmp_path / "m.onnx")["conv2"][1], expected.numpy())
