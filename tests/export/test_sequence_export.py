"""ONNX export of a sequence model: the tiny char_gpt (token + position embeddings, fused qkv causal attention,
GELU, LayerNorm) against PyTorch at every position, with int64 token ids and perplexity from both sides."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hawq
from hawq.export import export_onnx, run_onnx, verify_onnx
from hawq.quant.ranges import set_weight_range_

T = 12


def _tiny_lm(seed: int = 0, w_bits: int | None = 4, a_bits: int | None = 8):
    torch.manual_seed(seed)
    model = hawq.create_model("char_gpt", context=T, d=32, layers=2, heads=2).eval()
    hawq.quantize_(model, {"re:.*": {"w_bits": w_bits, "a_bits": a_bits}})
    set_weight_range_(model, "max")  # the clipping search is slow and tested with the classifiers
    g = torch.Generator().manual_seed(100 + seed)
    hawq.calibrate_(model, [torch.randint(0, 256, (16, T), generator=g)])
    w = torch.randint(0, 256, (48, T + 1), generator=torch.Generator().manual_seed(7))
    return model, w[:, :-1], w[:, 1:]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(4-bit weights, 8-bit inputs char_gpt, inputs, targets, its ONNX file)."""
    model, x, y = _tiny_lm()
    path = tmp_path_factory.mktemp("lm") / "lm.onnx"
    export_onnx(model, path, x[:1])
    return model, x, y, path


@pytest.mark.parametrize(("w_bits", "a_bits", "opset"), [(4, 8, 21), (8, None, 14)])
def test_char_gpt_matches_pytorch_at_every_position(tmp_path, w_bits, a_bits, opset) -> None:
    model, x, y = _tiny_lm(w_bits=w_bits, a_bits=a_bits)
    # 8-bit weights alone need opset 13, but the causal mask's triu exports from 14 on
    report = export_onnx(model, tmp_path / "lm.onnx", x[:1])
    assert report.opset == opset and report.example_top1_agreement == 1.0
    v = verify_onnx(tmp_path / "lm.onnx", model, [(x[i : i + 16], y[i : i + 16]) for i in range(0, len(x), 16)])
    with torch.no_grad():
        ref = model(x)
    out = run_onnx(tmp_path / "lm.onnx", x.numpy())  # int64 token ids go in as int64
    assert out.shape == ref.shape == (len(x), T, 256)
    agree = np.mean(ref.argmax(-1).numpy() == out.argmax(-1))
    assert v.n_samples == len(x) and v.n_predictions == len(x) * T
    assert v.top1_agreement == agree >= 0.999
    assert v.max_abs_diff == pytest.approx(np.abs(ref.numpy() - out).max(), abs=1e-7)
    assert v.mean_abs_diff < 1e-4  # a rare one-level flip at an activation quantizer moves a few logits more
    assert v.onnx_top1 == np.mean(out.argmax(-1) == y.numpy())
    ppl = math.exp(float(F.cross_entropy(ref.flatten(0, 1), y.flatten())))  # the task's perplexity, in PyTorch
    assert math.exp(v.torch_cross_entropy) == pytest.approx(ppl, rel=1e-6)
    assert math.exp(v.onnx_cross_entropy) == pytest.approx(ppl, rel=1e-5)


def test_run_onnx_feeds_token_ids_as_integers(exported) -> None:
    _, x, _, path = exported
    assert run_onnx(path, x.int().numpy()).shape == (len(x), T, 256)
    with pytest.raises(ValueError, match=r"input is tensor\(int64\)"):
        run_onnx(path, x.float().numpy())


def test_sequence_roundoff_fallback_and_failure(exported) -> None:
    model, x, y, path = exported
    # an agreement bar no model meets forces the round-off measurement: the float64 model runs on the token ids
    v = verify_onnx(path, model, [(x, y)], min_agreement=1.01)
    assert v.roundoff_images == len(x) and v.roundoff_top1_agreement > 0.99
    assert v.onnx_float64_mean_abs_diff <= 8 * v.roundoff_mean_abs_diff
    other, _, _ = _tiny_lm(seed=1)
    with pytest.raises(ValueError, match=rf"below 99\.9% .* on {len(x) * T} predictions of {len(x)} inputs"):
        verify_onnx(path, other, [(x, y)])
    with pytest.raises(ValueError, match="labels for"):
        verify_onnx(path, model, [(x, y[:, 0])])
