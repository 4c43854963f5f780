"""The quantized weight kept between gradient-free forwards: computed once, never stale."""

from __future__ import annotations

import torch
from torch import nn

import hawq.quant.modules as modules
from hawq.quant import fake_quant_weight, quantize_


def _model() -> nn.Module:
    torch.manual_seed(0)
    return quantize_(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), {"re:.*": 3})


def _expected(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    a, b = model[0], model[2]
    h = torch.relu(x @ fake_quant_weight(a.weight.detach(), 3).T + a.bias)
    return h @ fake_quant_weight(b.weight.detach(), 3).T + b.bias


def test_clip_search_runs_once_across_gradient_free_forwards(monkeypatch):
    model, x = _model(), torch.randn(4, 6)
    calls = []
    real = modules.fake_quant_weight
    monkeypatch.setattr(modules, "fake_quant_weight", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        for _ in range(3):
            model(x)
    assert len(calls) == 2  # once per layer
    with torch.inference_mode():
        model(x)
    assert len(calls) == 2
    model(x).sum().backward()  # with gradients: recomputed every time (the weight changes every step)
    assert len(calls) == 4


def test_cached_quantized_weight_follows_every_weight_change():
    model, x = _model(), torch.randn(4, 6)
    with torch.no_grad():
        assert torch.equal(model(x), _expected(model, x))
        model[0].weight.mul_(1.7)  # in place
        assert torch.equal(model(x), _expected(model, x))
        other = _model()
        for p in other.parameters():
            p.add_(torch.randn_like(p))
        model.load_state_dict(other.state_dict())
        assert torch.equal(model(x), _expected(model, x))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).pow(2).sum().backward()
    opt.step()
    with torch.no_grad():
        assert torch.equal(model(x), _expected(model, x))
    model[2].weight = nn.Parameter(torch.randn(3, 5))  # a new tensor
    with torch.inference_mode():
        assert torch.equal(model(x), _expected(model, x))
    model[0].w_bits = 2  # another bit width
    with torch.no_grad():
        w = model[0].weight
        want = torch.relu(x @ fake_quant_weight(w, 2).T + model[0].bias) @ fake_quant_weight(model[2].weight, 3).T
        assert torch.equal(model(x), want + model[2].bias)
