"""Fixtures for export tests: tiny models with non-trivial batch norm, quantized and calibrated."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import hawq

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _randomize_bn_(model: nn.Module, g: torch.Generator) -> None:
    """Batch norm statistics away from the identity, some scales negative, as after training."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            gamma = torch.rand(c, generator=g) * 2.0 - 0.6
            gamma[0] = -0.2 - gamma[0].abs()  # a negative scale flips its channel's levels when folded
            m.weight.data.copy_(gamma)
            m.bias.data.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)


def make_quantized(name: str, plan: dict, seed: int = 0, n_calib: int = 32) -> tuple[nn.Module, torch.Tensor]:
    """(model quantized by `plan` and calibrated, a batch of 28x28 inputs it was not calibrated on)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = hawq.create_model(name, in_channels=1)
    _randomize_bn_(model, g)
    model.eval()
    hawq.quantize_(model, plan)
    hawq.calibrate_(model, [torch.randn(n_calib, 1, 28, 28, generator=g)])
    return model, torch.randn(16, 1, 28, 28, generator=g)


@pytest.fixture
def quantized() -> Callable[..., tuple[nn.Module, torch.Tensor]]:
    return make_quantized
