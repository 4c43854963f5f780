"""Activation traces against the dense per-image Hessian w.r.t. each layer's own input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian

from hawq.hessian import estimate_activation_traces
from hawq.quant import quantizable_layers


def dense_activation_traces(model, x, y, layers):
    """mean_i Tr(d^2 CE(f(x_i), y_i) / d a_i^2) / numel(a_i), a_i replacing layer l's input only."""
    model.eval()
    mods = dict(model.named_modules())
    out = {}
    for name in layers:
        m, vals = mods[name], []
        for i in range(x.shape[0]):
            seen = []
            h = m.register_forward_pre_hook(lambda mod, args, seen=seen: seen.append(args[0].detach()))
            model(x[i : i + 1])
            h.remove()
            a0 = seen[0]

            def f(a, i=i, m=m):
                h = m.register_forward_pre_hook(lambda mod, args: (a,))
                try:
                    return F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
                finally:
                    h.remove()

            hess = hessian(f, a0).reshape(a0.numel(), a0.numel())
            vals.append(float(hess.diagonal().sum()) / a0.numel())
        out[name] = sum(vals) / len(vals)
    return out


@pytest.mark.parametrize("case", ["tiny_mlp_case", "tiny_cnn_case"])
def test_exact_activation_traces_equal_dense(case, request):
    model, x, y = request.getfixturevalue(case)
    x, y = x[:6], y[:6]
    layers = quantizable_layers(model)
    dense = dense_activation_traces(model, x, y, layers)
    r = estimate_activation_traces(model, [(x, y)], method="exact", progress=False)
    assert r.method == "exact" and r.n_images == 6
    numel = {"fc1": 8, "fc2": 6, "fc3": 6, "conv1": 64, "conv2": 64, "fc": 4}  # one image's input
    for lt in r.layers:
        assert lt.n_params == numel[lt.fqn]
        assert lt.trace == pytest.approx(dense[lt.fqn], rel=1e-6), lt.fqn


def test_hutchinson_activation_traces_on_a_curved_net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4), nn.GELU(), nn.Linear(4, 3)).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    layers = ["0", "2", "4"]
    dense = dense_activation_traces(model, x, y, layers)
    r = estimate_activation_traces(
        model,
        [(x[i : i + 4], y[i : i + 4]) for i in range(0, 16, 4)] * 25,
        max_images=None,
        rel_tol=0.02,
        progress=False,
        chunk_size=4,
        probes_per_batch=2,
        max_probes=400,
    )
    assert r.method == "hutchinson" and any("GELU" in n for n in r.notes)
    for lt in r.layers:
        assert abs(lt.trace - dense[lt.fqn]) <= 3 * lt.stderr, (lt.fqn, lt.trace, dense[lt.fqn], lt.stderr)
    scale = max(abs(v) for v in dense.values())
    assert all(lt.stderr < 0.05 * scale for lt in r.layers)  # informative error bars


@pytest.mark.parametrize("method", ["mc_fisher", "hybrid"])
def test_sampled_activation_traces_are_unbiased(tiny_cnn_case, method):
    model, x, y = tiny_cnn_case
    with torch.no_grad():
        model.fc.weight.mul_(8.0)  # confident and uncertain images, so hybrid mixes both
    exact = estimate_activation_traces(model, [(x, y)], method="exact", progress=False)
    r = estimate_activation_traces(
        model, [(x, y)] * 40, method=method, max_images=None, rel_tol=0.02, progress=False, seed=2
    )
    for le, lt in zip(exact.layers, r.layers):
        assert abs(lt.trace - le.trace) <= 3 * lt.stderr and lt.stderr < 0.1 * le.trace


def test_activation_state_restored(tiny_cnn_case):
    model, x, y = tiny_cnn_case
    model.train()
    req = [p.requires_grad for p in model.parameters()]
    estimate_activation_traces(model, [(x, y)], progress=False)
    assert model.training and req == [p.requires_grad for p in model.parameters()]
