"""verify_onnx: agreement and accuracies by brute force, and a loud failure on a wrong model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hawq.export import VerifyReport, export_onnx, run_onnx, verify_onnx


def test_verify_counts_by_brute_force(quantized, tmp_path) -> None:
    model, x = quantized("tiny_cnn", {"re:.*": {"w_bits": 4, "a_bits": 8}})
    export_onnx(model, tmp_path / "m.onnx", x[:1])
    y = torch.arange(len(x)) % 10
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    report = verify_onnx(tmp_path / "m.onnx", model, batches)
    with torch.no_grad():
        ref = model(x).numpy()
    out = run_onnx(tmp_path / "m.onnx", x.numpy())
    assert report.n_samples == len(x)
    assert report.top1_agreement == np.mean(ref.argmax(1) == out.argmax(1)) == 1.0
    assert report.torch_top1 == np.mean(ref.argmax(1) == y.numpy())
    assert report.onnx_top1 == np.mean(out.argmax(1) == y.numpy())
    assert report.max_abs_diff == pytest.approx(np.abs(ref - out).max(), abs=1e-7)
    assert VerifyReport.from_dict(report.to_dict()) == report
    unlabeled = verify_onnx(tmp_path / "m.onnx", model, [x])
    assert unlabeled.torch_top1 is None and unlabeled.onnx_top1 is None


def test_verify_fails_loudly_on_a_different_model(quantized, tmp_path) -> None:
    model, x = quantized("tiny_cnn", {"re:.*": {"w_bits": 4, "a_bits": 8}})
    export_onnx(model, tmp_path / "m.onnx", x[:1])
    other, _ = quantized("tiny_cnn", {"re:.*": {"w_bits": 4, "a_bits": 8}}, seed=1)
    with pytest.raises(ValueError, match=r"top-1 agreement .* below 99\.9%"):
        verify_onnx(tmp_path / "m.onnx", other, [torch.randn(64, 1, 28, 28)])


def test_verify_needs_batches(quantized, tmp_path) -> None:
    model, x = quantized("tiny_cnn", {"re:.*": 8})
    export_onnx(model, tmp_path / "m.onnx", x[:1])
    with pytest.raises(ValueError, match="no batches"):
        verify_onnx(tmp_path / "m.onnx", model, [])
