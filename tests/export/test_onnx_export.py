"""export_onnx: the exported model is the fake-quantized model, with packed integer weights."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import hawq
from hawq.export import export_onnx, layer_levels, run_onnx, size_breakdown

WEIGHT_TYPE = {1: "INT2", 2: "INT2", 3: "PACKED3", 4: "INT4", 5: "PACKED5", 6: "PACKED6", 7: "PACKED7", 8: "INT8"}
STORED_TYPE = {"INT2": "INT2", "INT4": "INT4", "INT8": "INT8"}  # else UINT8 bytes
OPSET = {"INT2": 25, "INT4": 21}  # else 13


def _torch_logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_tiny_round_trip(quantized, tmp_path) -> None:
    model, x = quantized("tiny_cnn", {"re:.*": {"w_bits": 4, "a_bits": 8}})
    report = export_onnx(model, tmp_path / "m.onnx", x[:2])
    proto = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert report.opset == 21 and proto.opset_import[0].version == 21
    assert report.file_size_bytes == (tmp_path / "m.onnx").stat().st_size
    assert [layer.fqn for layer in report.layers] == ["conv1", "conv2", "fc"]
    assert [layer.bn_folded for layer in report.layers] == [True, False, False]
    ops = _ops(tmp_path / "m.onnx")
    assert "BatchNormalization" not in ops and not any(n.domain == "hawq" for n in proto.graph.node)
    assert ops.count("QuantizeLinear") == 3 and ops.count("DequantizeLinear") == 6
    ref, out = _torch_logits(model, x), run_onnx(tmp_path / "m.onnx", x.numpy())
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    assert (out.argmax(1) == ref.argmax(1)).all()
    assert report.example_top1_agreement == 1.0
    # the export round-trips through its report
    assert type(report).from_dict(report.to_dict()) == report


def _weight_initializers(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    names = {v[3] for v in json.loads(proto.metadata_props[0].value).values() if v[3] is not None}
    return [t for t in proto.graph.initializer if t.name in names]


@pytest.mark.parametrize("w_bits", range(1, 9))
@pytest.mark.parametrize("a_bits", [None, 4, 8])
def test_every_bit_width_exports_and_matches(quantized, tmp_path, w_bits, a_bits) -> None:
    model, x = quantized("tiny_cnn", {"re:.*": {"w_bits": w_bits, "a_bits": a_bits}}, seed=w_bits)
    path = tmp_path / "m.onnx"
    report = export_onnx(model, path, x[:2])
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    w_type = WEIGHT_TYPE[w_bits]
    assert report.opset == OPSET.get(w_type, 13)
    assert {layer.w_type for layer in report.layers} == {w_type}
    weights = _weight_initializers(proto)
    assert len(weights) == 3
    assert {onnx.TensorProto.DataType.Name(t.data_type) for t in weights} == {STORED_TYPE.get(w_type, "UINT8")}
    assert len(proto.functions) == (w_type.startswith("PACKED"))
    ref, out = _torch_logits(model, x), run_onnx(path, x.numpy())
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    assert (out.argmax(1) == ref.argmax(1)).all()


def _onnxruntime_weights(path, proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The dequantized weights as onnxruntime computes them: every DequantizeLinear output made a graph output."""
    import onnxruntime as ort

    names = [n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.zeros((1, 1, 28, 28), np.float32)
    return dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: x}), strict=True))


@pytest.mark.parametrize("w_bits", range(1, 9))
def test_stored_levels_are_the_fake_quant_levels(quantized, tmp_path, w_bits) -> None:
    """Levels x scales read back from the file, in numpy and in onnxruntime, are the fake-quant weights exactly."""
    model, x = quantized("tiny_cnn", {"conv2": {"w_bits": w_bits, "a_bits": None},
                                      "fc": {"w_bits": w_bits, "a_bits": None}}, seed=10 + w_bits)
    export_onnx(model, tmp_path / "m.onnx", x[:2])
    stored = layer_levels(tmp_path / "m.onnx")
    assert set(stored) == {"conv2", "fc"}
    by_ort = _onnxruntime_weights(tmp_path / "m.onnx", onnx.load(str(tmp_path / "m.onnx")))
    for fqn, (levels, scales) in stored.items():
        w = model.get_submodule(fqn).weight.detach()
        expected_levels, expected_scales = hawq.quant.weight_to_int(w, w_bits)
        np.testing.assert_array_equal(levels, expected_levels.numpy())
        np.testing.assert_array_equal(scales, expected_scales.numpy())
        expected = hawq.quant.fake_quant_weight(w, w_bits).numpy()
        np.testing.assert_array_equal(levels * scales.reshape(-1, *[1] * (levels.ndim - 1)), expected)
        assert any(np.array_equal(v, expected) for v in by_ort.values()), f"{fqn}: onnxruntime's weight differs"
        assert np.abs(levels).max() <= max(1, 2 ** (w_bits - 1) - 1)


@pytest.mark.parametrize("bits", range(1, 9))
def test_weights_are_stored_packed(quantized, tmp_path, bits) -> None:
    model, x = quantized("tiny_cnn", {"re:.*": {"w_bits": bits, "a_bits": None}})
    parts = size_breakdown(export_onnx(model, tmp_path / "m.onnx", x[:1]).path)
    sizes = [m.weight.numel() for m in hawq.quant.quant_layers(model).values()]  # 36, 144, 40
    if bits in (3, 5, 6, 7):  # whole groups of eight b-bit fields per layer
        stored = sum(-(-n // 8) * bits for n in sizes)
        assert parts["packed_weight_bytes"] == stored
    else:  # whole bytes per layer, one bit stored in two
        stored = sum(-(-n * max(bits, 2) // 8) for n in sizes)
        assert parts["packed_weight_bytes"] == 0
    assert parts["int_weight_bytes"] == stored
    assert parts["plan_weight_bytes"] == sum(sizes) * bits / 8
    assert parts["container_padding_bytes"] == stored - sum(sizes) * bits / 8
    assert parts["scale_bytes"] == 4 * (4 + 4 + 10)
    assert sum(parts[k] for k in ("int_weight_bytes", "scale_bytes", "zero_point_bytes",
                                  "float_param_bytes", "protobuf_overhead_bytes")) == parts["file_size_bytes"]


def test_mixed_plan_on_resnet20(quantized, tmp_path) -> None:
    names = hawq.quantizable_layers(hawq.create_model("resnet20", in_channels=1))
    bits = [2, 3, 4, 8]
    plan = {n: {"w_bits": 8 if i in (0, len(names) - 1) else bits[i % 4], "a_bits": 8 if i % 2 else 4}
            for i, n in enumerate(names)}
    model, x = quantized("resnet20", plan, seed=3)
    report = export_onnx(model, tmp_path / "m.onnx", x[:2])
    assert report.opset == 25 and sum(layer.bn_folded for layer in report.layers) == len(names) - 1
    assert "BatchNormalization" not in _ops(tmp_path / "m.onnx")
    ref, out = _torch_logits(model, x), run_onnx(tmp_path / "m.onnx", x.numpy())
    # onnxruntime sums in another order: a value next to a rounding boundary of a 4-bit input can land on
    # the other level (0.003 here with every onnxruntime optimization off, 0.009 with them on)
    np.testing.assert_allclose(out, ref, atol=0.02)
    assert (out.argmax(1) == ref.argmax(1)).all()
    parts = size_breakdown(tmp_path / "m.onnx")
    assert parts["plan_weight_bytes"] == sum(model.get_submodule(n).weight.numel() * p["w_bits"]
                                             for n, p in plan.items()) / 8
    proto = onnx.load(str(tmp_path / "m.onnx"))
    n_3bit = sum(p["w_bits"] == 3 for p in plan.values())
    assert [f.name for f in proto.functions] == ["Unpack3"]  # one decoder, shared by the 3-bit layers
    assert sum(n.op_type == "Unpack3" and n.domain == "hawq" for n in proto.graph.node) == n_3bit
    assert not any(n.name for n in proto.graph.node)
    # 3-bit layers are bit-packed: nothing is padded (every layer has a multiple of 8 weights)
    assert parts["container_padding_bytes"] == 0
    assert parts["packed_weight_bytes"] == sum(model.get_submodule(n).weight.numel() * 3
                                               for n, p in plan.items() if p["w_bits"] == 3) / 8


def test_float_model_exports_with_bn_folded(tmp_path) -> None:
    torch.manual_seed(0)
    model = hawq.create_model("resnet20", in_channels=1).eval()
    x = torch.randn(4, 1, 28, 28)
    report = export_onnx(model, tmp_path / "fp32.onnx", x[:1])
    assert report.opset == 13 and report.layers == ()
    assert "BatchNormalization" not in _ops(tmp_path / "fp32.onnx")
    np.testing.assert_allclose(run_onnx(tmp_path / "fp32.onnx", x.numpy()), _torch_logits(model, x),
                               rtol=1e-4, atol=1e-4)


class _Bessel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.i0(x)


class _WithBessel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.head = nn.Sequential(nn.Flatten(), _Bessel(), nn.Linear(2 * 26 * 26, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))


def test_unsupported_layer_is_named(tmp_path) -> None:
    model = hawq.quantize_(_WithBessel().eval(), {"re:.*": 4})
    with pytest.raises(ValueError, match=r"layer 'head\.1' \(_Bessel\) cannot be exported"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 1, 28, 28))
    assert not (tmp_path / "m.onnx").exists()


def test_unknown_quantized_layer_type_is_named(tmp_path) -> None:
    class MyQuantConv(hawq.quant.QuantConv2d):
        pass

    model = hawq.create_model("tiny_cnn").eval()
    model.conv2 = MyQuantConv.from_float(model.conv2, 4)
    with pytest.raises(ValueError, match=r"layer 'conv2' is a MyQuantConv"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 1, 28, 28))


def test_uncalibrated_layer_is_named(tmp_path) -> None:
    model = hawq.quantize_(hawq.create_model("tiny_cnn").eval(), {"fc": {"w_bits": 8, "a_bits": 8}})
    with pytest.raises(ValueError, match=r"layer 'fc' .*calibrate_"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 1, 28, 28))


def test_opset_too_low_names_the_layer(quantized, tmp_path) -> None:
    model, x = quantized("tiny_cnn", {"conv1": 8, "conv2": 2, "fc": 8})
    with pytest.raises(ValueError, match=r"layer 'conv2' needs ONNX opset 25"):
        export_onnx(model, tmp_path / "m.onnx", x[:1], opset=21)


def test_importing_hawq_does_not_import_onnx() -> None:
    code = "import sys, hawq, hawq.export; print('onnx' in sys.modules or 'onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
