"""Tiny float64 nets with their dense per-layer Hessian blocks (torch.func.hessian), the ground truth."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, hessian

import hawq.models as M


def dense_layer_traces(model: nn.Module, x: Tensor, y: Tensor, layers: list[str]) -> dict[str, Tensor]:
    """Diagonal of the dense Hessian block of the mean cross-entropy w.r.t. each layer's weight."""
    was = model.training
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    out = {}
    for name in layers:
        key = f"{name}.weight"

        def f(w, key=key):
            p = dict(params)
            p[key] = w
            return F.cross_entropy(functional_call(model, p, (x,)), y)

        w = params[key]
        h = hessian(f)(w).reshape(w.numel(), w.numel())
        out[name] = h.diagonal().reshape(w.shape)
    model.train(was)
    return out


@pytest.fixture
def dense_traces():
    return dense_layer_traces


def _perturb_bn(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=m.running_mean.dtype))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=m.running_var.dtype) + 0.5)
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=gen, dtype=m.weight.dtype))


@pytest.fixture
def tiny_mlp_case():
    torch.manual_seed(0)
    model = M.create_model("tiny_mlp").double()
    x = torch.randn(24, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (24,))
    return model, x, y


@pytest.fixture
def tiny_cnn_case():
    torch.manual_seed(0)
    model = M.create_model("tiny_cnn").double()
    _perturb_bn(model, torch.Generator().manual_seed(1))
    x = torch.randn(12, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (12,))
    return model, x, y


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: a second thread only adds contention (other jobs share the 2 cores)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
