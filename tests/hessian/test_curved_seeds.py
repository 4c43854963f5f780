"""gn_residual on trained curved nets against the dense Hessian: unbiased over seeds, small bias with many probes."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hawq.hessian import estimate_traces
from hawq.quant import quantizable_layers


class CurvedMLP(nn.Module):  # GELU, LayerNorm, SiLU, Tanh: every hidden layer curved
    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2, self.fc3, self.fc4 = (nn.Linear(6, 12), nn.LayerNorm(12), nn.Linear(12, 10),
                                                            nn.Linear(10, 8), nn.Linear(8, 4))

    def forward(self, x):
        h = F.gelu(self.norm(self.fc1(x)))
        return self.fc4(torch.tanh(self.fc3(F.silu(self.fc2(h)))))


def _trained():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 6, generator=g, dtype=torch.float64) * 1.5
    y = torch.randint(0, 4, (256,), generator=g)
    x = centers[y] + torch.randn(256, 6, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = CurvedMLP().double()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x[:64], y[:64]


@pytest.mark.slow
def test_gn_residual_over_twenty_seeds_is_unbiased_with_bias_below_two_percent(dense_traces):
    model, x, y = _trained()
    layers = quantizable_layers(model)
    dense = {k: float(v.mean()) for k, v in dense_traces(model, x, y, layers).items()}
    gn = estimate_traces(model, [(x, y)], method="exact", progress=False)
    assert max(abs(lt.trace / dense[lt.fqn] - 1) for lt in gn.layers) > 0.02  # Gauss-Newton alone is biased
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = [estimate_traces(model, [(x, y)] * 40, chunk_size=16, max_images=None, rel_tol=1e-3, seed=s,
                                progress=False) for s in range(20)]
    assert all(r.method == "gn_residual" for r in runs)
    for i, f in enumerate(layers):
        vals = torch.tensor([r.layers[i].trace for r in runs], dtype=torch.float64)
        mean, se = float(vals.mean()), float(vals.std() / math.sqrt(len(vals)))
        assert abs(mean - dense[f]) <= 3 * se + 1e-12, (f, mean, dense[f], se)
        inside = sum(abs(r.layers[i].trace - dense[f]) <= 3 * r.layers[i].stderr for r in runs)
        assert inside >= 18, (f, inside)  # the reported standard errors are honest too
        assert abs(mean / dense[f] - 1) < 0.02, (f, mean, dense[f])  # 800 chunks of one probe per layer over the seeds
