"""Losses other than cross-entropy: Gauss-Newton from the loss's own output Hessian (+ the probed residual),
against the dense Hessian of that loss."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, hessian
from torchvision.ops import sigmoid_focal_loss

from hawq.hessian import estimate_traces
from hawq.hessian.output_hessian import CoupledOutputsError, loss_gn_traces, output_hessian_diagonal
from hawq.quant import quantizable_layers


def focal_l1(out: Tensor, y: Tensor) -> Tensor:
    """A RetinaNet-like dense loss, the mean over images: sigmoid focal on the first 3 outputs of every
    'anchor', L1 on the last 2 (boxes), per image normalised by a target-only count."""
    cls, box = out[..., :3], out[..., 3:]
    t_cls, t_box = y[..., :3], y[..., 3:]
    n = t_cls.sum(dim=(1, 2)).clamp_min(1)  # "foreground anchors" per image: targets only
    per = (sigmoid_focal_loss(cls, t_cls, reduction="none").sum(dim=(1, 2))
           + F.l1_loss(box, t_box, reduction="none").sum(dim=(1, 2))) / n
    return per.mean()


class Dense(nn.Module):
    """Per-'anchor' outputs (B, A, 5) from a small net; `act` sets whether it is piecewise linear."""

    def __init__(self, act=F.relu):
        super().__init__()
        self.act = act
        self.fc1, self.fc2, self.head = nn.Linear(6, 10), nn.Linear(10, 10), nn.Linear(10, 4 * 5)

    def forward(self, x):
        return self.head(self.act(self.fc2(self.act(self.fc1(x))))).reshape(x.shape[0], 4, 5)


def _case(act, n=48):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = Dense(act).double().eval()
    with torch.no_grad():
        model.head.weight.mul_(4.0)
        model.head.bias.add_(2.5)  # some confident wrong logits: the focal loss's negative curvature shows (11% of |h|)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.cat([(torch.rand(n, 4, 3, generator=g) < 0.3).double(),
                   torch.randn(n, 4, 2, generator=g, dtype=torch.float64)], -1)
    return model, x, y


def _trained(act, n=256, steps=150):
    """The net trained (Adam, full batch) on targets that depend on x: small residual gradients, positive traces."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    a = torch.randn(6, 12, generator=g, dtype=torch.float64)
    b = torch.randn(6, 8, generator=g, dtype=torch.float64) * 0.5
    y = torch.cat([(x @ a > 0.8).double().reshape(n, 4, 3), (x @ b).reshape(n, 4, 2)], -1)
    torch.manual_seed(0)
    model = Dense(act).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        focal_l1(model(x), y).backward()
        opt.step()
    return model.eval(), x[:48], y[:48]


def dense_traces(model, x, y, loss_fn) -> dict[str, float]:
    params = {k: v.detach() for k, v in model.named_parameters()}
    out = {}
    for name in quantizable_layers(model):
        key = f"{name}.weight"

        def f(w, key=key):
            return loss_fn(functional_call(model, {**params, key: w}, (x,)), y)

        w = params[key]
        out[name] = float(hessian(f)(w).reshape(w.numel(), w.numel()).diagonal().mean())
    return out


def test_output_hessian_of_an_elementwise_loss_is_its_diagonal():
    model, x, y = _case(F.relu, 8)
    z = model(x).detach()
    h = output_hessian_diagonal(z, y, focal_l1, torch.Generator().manual_seed(0))
    full = hessian(lambda t: focal_l1(t, y) * len(x))(z).reshape(z.numel(), z.numel())
    assert torch.allclose(h.reshape(-1), full.diagonal(), atol=1e-12)
    assert torch.allclose(full, torch.diag(full.diagonal()), atol=1e-12)  # the test loss is elementwise
    assert (h < 0).any()  # focal loss is not convex in its logits: the negative part matters


def test_a_loss_that_couples_outputs_is_refused():
    model, x, y = _case(F.relu, 8)
    coupled = lambda out, t: (out.sum(dim=(1, 2)) ** 2).mean()  # noqa: E731
    with pytest.raises(CoupledOutputsError):
        output_hessian_diagonal(model(x).detach(), y, coupled, torch.Generator().manual_seed(0))
    r = estimate_traces(model, [(x, y)], loss=coupled, progress=False, max_images=8)
    assert r.method == "hutchinson" and "couples output elements" in r.reason


def test_relu_net_elementwise_loss_equals_dense_hessian_in_expectation():
    """A ReLU net (every layer piecewise linear): the loss's Gauss-Newton trace is the Hessian trace; the
    sign-probe estimate over 300 draws is within 3 standard errors of the dense value, and auto uses it."""
    model, x, y = _case(F.relu)
    dense = dense_traces(model, x, y, focal_l1)
    names = list(dense)
    mods = dict(model.named_modules())
    gen = torch.Generator().manual_seed(1)
    draws = torch.stack([loss_gn_traces(model, [mods[n] for n in names], x, y, focal_l1, gen)[0].mean(0)
                         for _ in range(300)])
    for i, n in enumerate(names):
        mean, se = float(draws[:, i].mean()), float(draws[:, i].std() / math.sqrt(len(draws)))
        assert abs(mean - dense[n]) <= 3 * se + 1e-12, (n, mean, dense[n], se)
        assert abs(mean / dense[n] - 1) < 0.05, (n, mean, dense[n])
    r = estimate_traces(model, [(x, y)], loss=focal_l1, progress=False, max_images=None)
    assert r.method == "gn_residual" and "output Hessian is elementwise" in r.reason
    assert any("own output Hessian" in note for note in r.notes)


@pytest.mark.parametrize("act", [F.gelu, F.silu], ids=["gelu", "silu"])
def test_curved_net_elementwise_loss_gn_residual_is_unbiased(act):
    """Curved hidden layers of a trained net: the loss's Gauss-Newton part alone is biased; with the probed
    residual the mean over 20 seeds is within 3 standard errors of the dense trace and within 2% of it."""
    model, x, y = _trained(act)
    dense = dense_traces(model, x, y, focal_l1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = [estimate_traces(model, [(x, y)] * 30, loss=focal_l1, max_images=None, rel_tol=1e-9, seed=s,
                                chunk_size=16, probes_per_batch=2, progress=False) for s in range(20)]
    assert all(r.method == "gn_residual" for r in runs)
    for i, n in enumerate(dense):
        vals = torch.tensor([r.layers[i].trace for r in runs], dtype=torch.float64)
        mean, se = float(vals.mean()), float(vals.std() / math.sqrt(len(vals)))
        assert abs(mean - dense[n]) <= 3 * se + 1e-12, (n, mean, dense[n], se)
        assert abs(mean / dense[n] - 1) < 0.02, (n, mean, dense[n])
    # the Gauss-Newton part alone (no residual probes): biased on some curved hidden layer
    mods = dict(model.named_modules())
    gen = torch.Generator().manual_seed(2)
    g = torch.stack([loss_gn_traces(model, [mods[n] for n in dense], x, y, focal_l1, gen)[0].mean(0)
                     for _ in range(200)]).mean(0)
    biased = any(abs(float(g[i]) / dense[n] - 1) > 0.05 for i, n in enumerate(dense))
    assert biased
