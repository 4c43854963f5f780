"""Sequence cross-entropy (logits (B, T, C), targets (B, T)) against dense Hessians of a tiny transformer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

from hawq.hessian import estimate_traces
from hawq.hessian.hutchinson import IGNORE_INDEX, cross_entropy

V, D, T = 6, 8, 4


class TinyGPT(nn.Module):
    """Token and position embeddings, causal self-attention through one fused qkv Linear, GELU MLP, LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(V, D), nn.Embedding(T, D)
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.head = nn.Linear(D, V)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        h = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        att = (q @ k.transpose(1, 2)) / math.sqrt(D)
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        h = h + self.proj(att @ v)
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        return self.head(self.ln3(h))


class TokenMLP(nn.Module):
    """Piecewise linear in every layer's weights: embedding, ReLU MLP per token."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, V)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.tok(idx))))


def _data(n: int, t: int = T, seed: int = 0, ignored: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (n, t), generator=g)
    y = torch.randint(0, V, (n, t), generator=g)
    if ignored:
        y.view(-1)[torch.randperm(n * t, generator=g)[:ignored]] = IGNORE_INDEX
    return x, y


def dense_traces(model: nn.Module, x: torch.Tensor, y: torch.Tensor, layers) -> dict[str, float]:
    """Tr(H_l)/n_l of the sequence cross-entropy of (x, y), from torch.func.hessian (float64)."""
    model = model.double().eval()
    params = dict(model.named_parameters())
    out = {}
    for name in layers:
        key = f"{name}.weight"

        def loss(w, key=key):
            return cross_entropy(functional_call(model, {**params, key: w}, (x,)), y)

        w = params[key].detach()
        h = hessian(loss)(w).reshape(w.numel(), w.numel())
        out[name] = float(torch.diagonal(h).sum().detach()) / w.numel()
    model.float()
    return out


def dense_gauss_newton(model: nn.Module, x: torch.Tensor, y: torch.Tensor, layers) -> dict[str, float]:
    """Tr(G_l)/n_l, G = mean over sequences of J^T H_z J with H_z = blockdiag_t(diag p_t - p_t p_t^T) / n_b over
    the counted tokens (float64, from full Jacobians)."""
    model = model.double().eval()
    params = dict(model.named_parameters())
    out = {}
    for name in layers:
        key, total = f"{name}.weight", 0.0
        w = params[key].detach()
        for b in range(len(x)):
            def logits(w, b=b, key=key):
                return functional_call(model, {**params, key: w}, (x[b : b + 1],))[0]  # (T, V)

            jac = torch.func.jacrev(logits)(w).reshape(x.shape[1], V, -1)  # (T, V, n)
            p = logits(w).softmax(-1).detach()
            keep = y[b] != IGNORE_INDEX
            for t in range(x.shape[1]):
                if keep[t]:
                    hz = torch.diag(p[t]) - torch.outer(p[t], p[t])
                    total += float(torch.einsum("cn,cd,dn->", jac[t], hz, jac[t]).detach()) / int(keep.sum())
        out[name] = total / len(x) / w.numel()
    model.float()
    return out


def _estimate(model, x, y, repeats: int, **kw):
    return estimate_traces(model, [(x, y)] * repeats, max_images=len(x) * repeats, chunk_size=len(x),
                           rel_tol=1e-9, progress=False, **kw)


def test_builtin_cross_entropy_takes_sequences_with_the_per_sequence_mean():
    logits, y = torch.randn(3, T, V), _data(3, ignored=3)[1]
    counted = (y != IGNORE_INDEX).sum(1)
    per_token = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    want = (per_token.reshape(3, T).sum(1) / counted).mean()
    assert torch.allclose(cross_entropy(logits, y), want)
    full = _data(3)[1]  # no ignored tokens: PyTorch's flat cross-entropy over all tokens
    assert torch.allclose(cross_entropy(logits, full), F.cross_entropy(logits.reshape(-1, V), full.reshape(-1)))
    with pytest.raises(ValueError, match="do not match"):
        cross_entropy(logits, torch.zeros(3, T + 1, dtype=torch.long))


def test_one_token_sequences_of_a_piecewise_linear_net_are_exact():
    torch.manual_seed(0)
    model = TokenMLP()
    x, y = _data(16, t=1)
    res = _estimate(model, x, y, 1)
    assert res.method == "hybrid" and not any("random signs" in n for n in res.notes)
    dense = dense_traces(model, x, y, ["fc1", "fc2"])
    for lt in res.layers:
        assert lt.trace == pytest.approx(dense[lt.fqn], rel=1e-5, abs=1e-9), lt.fqn


@pytest.mark.parametrize("ignored", [0, 14])
def test_piecewise_linear_sequences_are_unbiased_and_the_residual_stays_out(ignored):
    torch.manual_seed(1)
    model = TokenMLP()
    x, y = _data(8, ignored=ignored)
    res = _estimate(model, x, y, 300)
    assert res.method == "hybrid" and any("random signs" in n for n in res.notes)
    dense = dense_traces(model, x, y, ["fc1", "fc2"])
    for lt in res.layers:
        assert abs(lt.trace - dense[lt.fqn]) <= 3 * lt.stderr + 1e-9, (lt.fqn, lt.trace, lt.stderr, dense[lt.fqn])
        assert abs(lt.trace / dense[lt.fqn] - 1) < 0.05, lt.fqn


@pytest.mark.parametrize("ignored", [0, 10])
def test_tiny_transformer_traces_match_the_dense_hessian(ignored):
    torch.manual_seed(2)
    model = TinyGPT()
    x, y = _data(8, seed=3, ignored=ignored)
    layers = ["qkv", "proj", "fc1", "fc2", "head"]
    res = estimate_traces(model, [(x, y)], max_images=8, progress=False)  # the defaults run on sequences
    assert res.method == "gn_residual" and "curved" in res.reason and [lt.fqn for lt in res.layers] == layers

    gn = _estimate(model, x, y, 150, method="hybrid")  # the Gauss-Newton part alone: tokens with random signs
    dense_gn = dense_gauss_newton(model, x, y, layers)
    for lt in gn.layers:
        assert abs(lt.trace - dense_gn[lt.fqn]) <= 3 * lt.stderr, (lt.fqn, lt.trace, lt.stderr, dense_gn[lt.fqn])
        assert abs(lt.trace / dense_gn[lt.fqn] - 1) < 0.05, (lt.fqn, lt.trace, dense_gn[lt.fqn])

    # plus the probed residual: the Hessian trace. Over seeds 0-10 the errors in standard errors looked normal
    # (|z| <= 2.5 but one 3.08 on fc2 at seed 0, fc1 and fc2 moving together); seed 1 is one of them.
    res = _estimate(model, x, y, 300, seed=1)
    dense = dense_traces(model, x, y, layers)
    for lt in res.layers:
        assert abs(lt.trace - dense[lt.fqn]) <= 3 * lt.stderr, (lt.fqn, lt.trace, lt.stderr, dense[lt.fqn])
    assert res["head"].trace == pytest.approx(dense["head"], rel=0.03)  # the last layer: no residual
