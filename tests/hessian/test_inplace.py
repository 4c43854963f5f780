"""Layers whose output an in-place op changes afterwards (ReLU(inplace=True) right after a conv or linear, as in
torchvision's VGG, SqueezeNet and RetinaNet heads): per-sample traces against the dense Hessian."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hawq.alloc import empirical_fisher
from hawq.hessian import estimate_traces
from hawq.hessian.output_hessian import loss_gn_traces


def _net(inplace: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=inplace), nn.Flatten(),
                         nn.Linear(4 * 5 * 5, 8), nn.ReLU(inplace=inplace), nn.Linear(8, 3)).double().eval()


def _data(n: int = 16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_exact_traces_with_in_place_relu_equal_the_dense_hessian(dense_traces):
    """Before: gradients were taken w.r.t. the tensor the in-place ReLU had overwritten, i.e. without its mask."""
    model, (x, y) = _net(True), _data()
    names = ["0", "3", "5"]
    dense = {k: float(v.mean()) for k, v in dense_traces(model, x, y, names).items()}
    r = estimate_traces(model, [(x, y)], method="exact", max_images=None, progress=False)
    for lt in r.layers:
        assert math.isclose(lt.trace, dense[lt.fqn], rel_tol=1e-9), (lt.fqn, lt.trace, dense[lt.fqn])


def test_elementwise_loss_traces_with_in_place_relu_equal_those_without():
    model, (x, _) = _net(True), _data()
    t = torch.randn(x.shape[0], 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss = lambda out, y: F.mse_loss(out, y, reduction="none").sum(1).mean()  # noqa: E731
    mods = dict(model.named_modules())
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([loss_gn_traces(model, [mods["0"], mods["3"]], x, t, loss, gen)[0].mean(0) for _ in range(200)])
    twin, gen = _net(False), torch.Generator().manual_seed(0)
    ref = torch.stack([loss_gn_traces(twin, [dict(twin.named_modules())[k] for k in ("0", "3")], x, t, loss, gen)[0]
                       .mean(0) for _ in range(200)])
    assert torch.allclose(draws, ref, rtol=1e-9, atol=0)  # same draws, same values as without in-place ops


def test_empirical_fisher_with_in_place_relu_equals_the_same_net_without():
    (x, y) = _data()
    a = empirical_fisher(_net(True), [(x, y)], ["0", "3", "5"], progress=False)
    b = empirical_fisher(_net(False), [(x, y)], ["0", "3", "5"], progress=False)
    for k in a:
        assert math.isclose(float(a[k]), float(b[k]), rel_tol=1e-9), (k, a[k], b[k])
