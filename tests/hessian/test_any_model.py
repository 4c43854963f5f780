"""Traces on the models users bring, checked against the dense Hessian (torch.func.hessian) on tiny nets.

Every case either equals the dense trace (to 1e-5 where the result is reported as the Hessian trace), is
within 3 standard errors of it where estimated, or is refused / noted: never silently wrong.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hawq.hessian import estimate_traces
from hawq.quant import quantizable_layers


def _avg(dense: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.mean()) for k, v in dense.items()}


class Reused(nn.Module):  # one layer applied twice: its output is quadratic in its weights
    def __init__(self):
        super().__init__()
        self.a, self.mid, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.head(torch.relu(self.mid(torch.relu(self.mid(h)))))


class PoolNet(nn.Module):  # a ReLU CNN whose pooling is curved
    def __init__(self, pool: str):
        super().__init__()
        self.pool = pool
        self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(2)  # (B, 4, P)
        if self.pool == "logsumexp":
            h = torch.logsumexp(h, dim=2)
        elif self.pool == "std":
            h = h.std(dim=2)
        else:
            h = torch.linalg.vector_norm(h, dim=2)
        return self.fc(h)


class Smooth(nn.Module):
    def __init__(self, act: nn.Module, norm: bool = False):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 7), nn.Linear(7, 5), nn.Linear(5, 3)
        self.act, self.norm = act, nn.LayerNorm(7) if norm else nn.Identity()

    def forward(self, x):
        return self.fc3(self.act(self.fc2(self.act(self.norm(self.fc1(x))))))


class Attention(nn.Module):  # softmax self-attention over a short sequence, then mean pooling
    def __init__(self, e: int = 4):
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(e, e), nn.Linear(e, e), nn.Linear(e, e), nn.Linear(e, e)
        self.head = nn.Linear(e, 3)

    def forward(self, x):  # (B, T, E)
        a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 2.0, dim=-1)
        return self.head(self.o(a @ self.v(x)).mean(1))


class SeqMLP(nn.Module):  # Linear on 3-D inputs, batch-first or sequence-first
    def __init__(self, seq_first: bool):
        super().__init__()
        self.seq_first = seq_first
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):  # (B, T, E)
        if self.seq_first:
            x = x.transpose(0, 1)  # (T, B, E)
        h = torch.relu(self.fc1(x))
        return self.fc2(h.mean(0 if self.seq_first else 1))


class Depthwise(nn.Module):  # depthwise conv and ReLU6 (MobileNet's piecewise-linear parts)
    def __init__(self):
        super().__init__()
        self.pw, self.dw, self.fc = nn.Conv2d(1, 4, 1), nn.Conv2d(4, 4, 3, groups=4, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu6(self.dw(F.relu6(self.pw(x))))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def _data(shape, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


EXACT = {  # proved piecewise linear: reported as the Hessian trace, must equal it
    "batch_first_3d_linear": (lambda: SeqMLP(False), (5, 4)),
    "sequence_first_3d_linear_T_eq_B": (lambda: SeqMLP(True), (16, 4)),  # T == B == 16
    "depthwise_conv_relu6": (lambda: Depthwise(), (1, 5, 5)),
}
CURVED = {  # curved: estimated (gn_residual) and within 3 standard errors of the dense trace
    "reused_layer": (lambda: Reused(), (6,), "called 2 times"),
    "logsumexp_pooling": (lambda: PoolNet("logsumexp"), (1, 5, 5), "logsumexp"),
    "std_pooling": (lambda: PoolNet("std"), (1, 5, 5), "std"),
    "vector_norm": (lambda: PoolNet("norm"), (1, 5, 5), "vector norm"),
    "gelu": (lambda: Smooth(nn.GELU()), (6,), "GELU"),
    "tanh": (lambda: Smooth(nn.Tanh()), (6,), "Tanh"),
    "silu": (lambda: Smooth(nn.SiLU()), (6,), "SiLU"),
    "layer_norm": (lambda: Smooth(nn.ReLU(), norm=True), (6,), "LayerNorm"),
    "softmax_attention": (lambda: Attention(), (5, 4), "softmax"),
}


@pytest.mark.parametrize("case", sorted(EXACT))
def test_piecewise_linear_cases_are_proved_and_equal_the_dense_hessian(case, dense_traces):
    build, shape = EXACT[case]
    torch.manual_seed(0)
    model = build().double().eval()
    x, y = _data(shape)
    layers = quantizable_layers(model)
    dense = _avg(dense_traces(model, x, y, layers))
    auto = estimate_traces(model, [(x, y)], progress=False, max_images=None)
    assert auto.method == "hybrid" and "piecewise linear" in auto.reason and not auto.notes
    exact = estimate_traces(model, [(x, y)], method="exact", progress=False, max_images=None)
    for lt in exact.layers:
        assert lt.trace == pytest.approx(dense[lt.fqn], rel=1e-5, abs=1e-12), lt.fqn


def _curved_case(case, dense_traces):
    """A CURVED case's model (seed 0, float64, eval), data, layers and dense average traces."""
    build, shape, _ = CURVED[case]
    torch.manual_seed(0)
    model = build().double().eval()
    x, y = _data(shape)
    layers = quantizable_layers(model)
    return model, x, y, layers, _avg(dense_traces(model, x, y, layers))


@pytest.mark.parametrize("case", sorted(CURVED))
def test_curved_cases_are_noted_and_estimated_within_three_stderr(case, dense_traces):
    why = CURVED[case][2]
    model, x, y, layers, dense = _curved_case(case, dense_traces)
    gn = estimate_traces(model, [(x, y)], method="exact", progress=False, max_images=None)
    # the case is really curved: Gauss-Newton alone is off somewhere by more than 1%
    assert max(abs(lt.trace - dense[lt.fqn]) / abs(dense[lt.fqn]) for lt in gn.layers) > 0.01
    # the same 16 images over and over: the target is their dense trace, the error bar is probe noise
    r = estimate_traces(model, [(x, y)] * 40, chunk_size=8, max_images=None, rel_tol=0.01, seed=3,
                        probes_per_batch=2, progress=False)
    assert r.method == "gn_residual" and why in r.reason
    assert len(r.notes) == 1 and "probed residual" in r.notes[0]
    for lt, g in zip(r.layers, gn.layers):
        assert abs(lt.trace - dense[lt.fqn]) <= 3 * lt.stderr + 1e-9, (lt.fqn, lt.trace, dense[lt.fqn], lt.stderr)
        if abs(g.trace - dense[lt.fqn]) <= 1e-6 * abs(dense[lt.fqn]):  # proved layers: GN exact, no probes
            assert lt.stderr <= 0.1 * abs(dense[lt.fqn]), (lt.fqn, lt.stderr, dense[lt.fqn])


def test_residual_is_zero_on_relu_layers_and_gn_residual_equals_exact_there(tiny_mlp_case):
    model, x, y = tiny_mlp_case
    ex = estimate_traces(model, [(x, y)], method="exact", progress=False)
    r = estimate_traces(model, [(x, y)], method="gn_residual", progress=False, seed=1)
    assert r.n_backward == estimate_traces(model, [(x, y)], method="hybrid", progress=False, seed=1).n_backward
    for a, b in zip(ex.layers, r.layers):  # no probes at all: the hybrid GN value, unbiased for exact
        assert abs(b.trace - a.trace) <= 3 * b.stderr


def test_layers_the_forward_never_calls_are_left_out_with_a_note():
    class Aux(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.aux = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x) if not self.training else (self.fc(x), self.aux(x))

    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    r = estimate_traces(Aux(), [(x, y)], progress=False)
    assert [lt.fqn for lt in r.layers] == ["fc"] and any("never called" in n and "aux" in n for n in r.notes)
    with pytest.raises(ValueError, match="aux are not called"):
        estimate_traces(Aux(), [(x, y)], ["fc", "aux"], progress=False)


def test_images_that_interact_are_refused():
    class Mix(nn.Module):  # mixes the images of a batch before a layer
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x - x.mean(0, keepdim=True))

    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    with pytest.raises(ValueError, match="images interact"):
        estimate_traces(Mix(), data, method="hybrid", progress=False)
    r = estimate_traces(Mix(), data, progress=False, max_probes=4)  # auto: the batch loss's own Hessian
    assert r.method == "hutchinson" and "images interact" in r.reason


class ManyClasses(nn.Module):
    def __init__(self, c: int = 100):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, c)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_many_class_route_is_unbiased_over_twenty_seeds():
    torch.manual_seed(0)
    model = ManyClasses().double()
    with torch.no_grad():
        model.fc2.weight.mul_(3.0)  # a spread of probabilities: top classes and a real tail
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 100, (32,))
    exact = estimate_traces(model, [(x, y)], method="exact", progress=False)
    runs = [estimate_traces(model, [(x, y)], method="hybrid", progress=False, seed=s) for s in range(20)]
    assert all(r.n_backward <= 12 * 32 for r in runs)  # 12 vectors per image at most, not 100
    for i, le in enumerate(exact.layers):
        vals = torch.tensor([r.layers[i].trace for r in runs], dtype=torch.float64)
        se = float(vals.std() / math.sqrt(len(vals)))
        assert abs(float(vals.mean()) - le.trace) <= 3 * se + 1e-12, (le.fqn, float(vals.mean()), le.trace, se)
        assert se < 0.05 * le.trace


class Encoder(nn.Module):  # nn.TransformerEncoderLayer (nn.MultiheadAttention, GELU, LayerNorm), then a head
    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.enc = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0, activation="gelu",
                                              batch_first=batch_first)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # (B, T, E)
        h = self.enc(x if self.batch_first else x.transpose(0, 1))
        return self.head(h.mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("batch_first", [True, False])
def test_decomposed_multihead_attention_traced_per_projection_and_matches_dense(batch_first, dense_traces):
    import hawq

    torch.manual_seed(0)
    model = Encoder(batch_first).double().eval()
    x, y = _data((3, 4), n=8)
    before = estimate_traces(model, [(x, y)], progress=False, max_probes=4)
    assert any("MultiheadAttention" in n for n in before.notes)  # projections in float: said so
    hawq.decompose_attention_(model)
    layers = quantizable_layers(model)
    projections = {f"enc.self_attn.{p}_proj" for p in ("q", "k", "v", "out")}
    assert projections <= set(layers)
    dense = _avg(dense_traces(model, x, y, layers))
    r = estimate_traces(model, [(x, y)] * 40, chunk_size=4, max_images=None, rel_tol=0.01, seed=2,
                        probes_per_batch=2, progress=False)
    assert r.method == "gn_residual" and [lt.fqn for lt in r.layers] == layers
    for lt in r.layers:
        assert abs(lt.trace - dense[lt.fqn]) <= 3 * lt.stderr + 1e-9, (lt.fqn, lt.trace, dense[lt.fqn], lt.stderr)
    assert r["head"].trace == pytest.approx(dense["head"], rel=0.1)  # proved layer: GN part only


def test_gn_residual_result_is_json_on_one_chunk():
    import json

    model = Smooth(nn.GELU()).double()
    x, y = _data((6,))
    r = estimate_traces(model, [(x, y)], progress=False)  # one chunk: residual error bar unknown
    assert r.method == "gn_residual"
    json.dumps(r.to_dict(), allow_nan=False)  # what write_json does: no inf anywhere
    assert math.isfinite(r["fc3"].stderr)  # the proved layer is never probed: its Gauss-Newton error bar stands


@pytest.mark.parametrize("case", ["gelu", "tanh", "silu", "layer_norm", "softmax_attention"])
def test_gn_residual_over_twenty_seeds_is_unbiased_on_each_curved_op(case, dense_traces):
    """The default probes (one per curved layer and chunk): over 20 seeds the mean is within 3 standard
    errors of the dense trace (1,200 probes per layer in all; proved layers, which get no probes, to 1e-6)."""
    model, x, y, layers, dense = _curved_case(case, dense_traces)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = [estimate_traces(model, [(x, y)] * 15, chunk_size=4, max_images=None, rel_tol=1e-9, seed=s,
                                progress=False) for s in range(20)]
    assert all(r.method == "gn_residual" for r in runs)
    for i, f in enumerate(layers):
        vals = torch.tensor([r.layers[i].trace for r in runs], dtype=torch.float64)
        mean, se = float(vals.mean()), float(vals.std() / math.sqrt(len(vals)))
        assert abs(mean - dense[f]) <= 3 * se + 1e-6 * abs(dense[f]), (f, mean, dense[f], se)
        assert se > 0 or abs(mean - dense[f]) <= 1e-6 * abs(dense[f])
