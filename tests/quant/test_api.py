import subprocess
import sys

import pytest
import torch

import hawq
from hawq.quant import LayerBits, QuantConv2d, QuantLinear, calibrate_, dequantize_, quantize_


def _model():
    torch.manual_seed(0)
    return hawq.create_model("tiny_cnn").eval()


def test_quantize_by_name_and_pattern_matches_manual_fake_quant():
    model, ref = _model(), _model()
    quantize_(model, {"conv1": {"w_bits": 4}, "re:conv2|fc": 2})
    assert isinstance(model.conv1, QuantConv2d) and model.conv1.w_bits == 4
    assert isinstance(model.fc, QuantLinear) and model.fc.w_bits == 2
    with torch.no_grad():
        ref.conv1.weight.copy_(hawq.quant.fake_quant_weight(ref.conv1.weight, 4))
        ref.conv2.weight.copy_(hawq.quant.fake_quant_weight(ref.conv2.weight, 2))
        ref.fc.weight.copy_(hawq.quant.fake_quant_weight(ref.fc.weight, 2))
    x = torch.randn(4, 1, 12, 12)
    assert torch.allclose(model(x), ref(x), atol=0, rtol=0)


def test_parameters_are_shared_and_round_trip_to_float():
    model = _model()
    w = model.conv1.weight
    quantize_(model, {"conv1": 8})
    assert model.conv1.weight is w
    dequantize_(model)
    assert type(model.conv1) is torch.nn.Conv2d and model.conv1.weight is w
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(model(x), _model()(x))


def test_calibration_sets_ranges_and_activation_quantization_applies():
    model = _model()
    quantize_(model, {"re:.*": {"w_bits": 8, "a_bits": 4}})
    x = torch.randn(8, 1, 12, 12)
    with pytest.raises(ValueError, match="calibrate"):
        model(x)
    calibrate_(model, [(x, None)])
    assert model.conv2.act_min >= 0  # after a ReLU: unsigned
    assert float(model.conv1.act_min) == pytest.approx(float(x.min()))
    out = model(x)
    assert out.shape == (8, 10)


def test_unknown_layer_and_bad_bits_are_clear_errors():
    with pytest.raises(ValueError, match="not a Conv2d/Linear"):
        quantize_(_model(), {"bn1": 4})
    with pytest.raises(ValueError, match="matches no"):
        quantize_(_model(), {"re:nothing.*": 4})
    with pytest.raises(ValueError, match="bit width"):
        quantize_(_model(), {"conv1": 9})


def test_layer_bits_json_round_trip():
    b = LayerBits(3, 8)
    assert LayerBits.from_dict(b.to_dict()) == b


def test_import_is_light():
    code = "import sys, hawq; print(any(m in sys.modules for m in ('onnx', 'matplotlib', 'onnxruntime')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
