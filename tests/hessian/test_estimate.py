"""estimate_traces against dense Hessians of tiny nets, and its contract (determinism, state, errors)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

from hawq.artifacts import dumps
from hawq.hessian import LayerTrace, TraceResult, estimate_traces, weights_hash
from hawq.quant import quantizable_layers


def _repeat(x, y, size, times):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)] * times


@pytest.mark.parametrize("case", ["tiny_mlp_case", "tiny_cnn_case"])
def test_exact_equals_dense_hessian_blocks(case, request, dense_traces):
    model, x, y = request.getfixturevalue(case)
    layers = quantizable_layers(model)
    dense = dense_traces(model, x, y, layers)
    r = estimate_traces(model, [(x, y)], method="exact", progress=False, diagonal=True, max_images=None)
    assert r.method == "exact" and r.n_images == x.shape[0] and r.notes == ()
    for lt in r.layers:
        want = dense[lt.fqn]
        assert lt.n_params == want.numel()
        assert lt.trace == pytest.approx(float(want.mean()), rel=1e-5)
        torch.testing.assert_close(r.diagonals[lt.fqn].double(), want, rtol=1e-5, atol=1e-7)


def test_chunking_does_not_change_the_exact_value(tiny_cnn_case):
    model, x, y = tiny_cnn_case
    a = estimate_traces(model, [(x, y)], method="exact", progress=False, chunk_size=5, max_images=None)
    b = estimate_traces(model, [(x[:7], y[:7]), (x[7:], y[7:])], method="exact", progress=False, chunk_size=64)
    for la, lb in zip(a.layers, b.layers):
        assert la.trace == pytest.approx(lb.trace, rel=1e-10)
        assert la.stderr == pytest.approx(lb.stderr, rel=1e-8)


def test_stderr_is_std_of_per_image_values_over_sqrt_n(tiny_mlp_case):
    model, x, y = tiny_mlp_case
    per_image = [
        estimate_traces(model, [(x[i : i + 1], y[i : i + 1])], method="exact", progress=False).layers[0].trace
        for i in range(x.shape[0])
    ]
    r = estimate_traces(model, [(x, y)], method="exact", progress=False)
    v = torch.tensor(per_image, dtype=torch.float64)
    assert r.layers[0].trace == pytest.approx(float(v.mean()), rel=1e-10)
    assert r.layers[0].stderr == pytest.approx(float(v.std() / len(v) ** 0.5), rel=1e-8)
    assert r.layers[0].n_samples == x.shape[0]


def test_layer_traces_sum_to_the_full_trace(tiny_mlp_case):
    model, x, y = tiny_mlp_case
    model.eval()
    names = [n for n, _ in model.named_parameters() if n.endswith("weight")]
    params = {k: v.detach() for k, v in model.named_parameters()}
    flat = torch.cat([params[n].reshape(-1) for n in names])

    def f(w):
        p, i = dict(params), 0
        for n in names:
            p[n] = w[i : i + params[n].numel()].reshape(params[n].shape)
            i += params[n].numel()
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    full = float(hessian(f)(flat).diagonal().sum())
    r = estimate_traces(model, [(x, y)], method="exact", progress=False)
    assert sum(lt.trace * lt.n_params for lt in r.layers) == pytest.approx(full, rel=1e-9)


# Unbiasedness of the stochastic methods (mc_fisher, mc_fisher_is, hybrid, hutchinson): tests/hessian/test_unbiased.py,
# on many distinct images, tight enough that a 5% bias fails (a repeated batch could not show that).


def test_diagonal_loss_trace_from_one_probe():
    # loss = 1/2 sum_j a_j w_j^2 with a fixed diagonal a: H = diag(a), v^T H v = sum a_j for every v
    lin = nn.Linear(5, 1, bias=False)
    a = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.5])

    class Diag(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return (0.5 * a * self.lin.weight[0] ** 2).sum().expand(x.shape[0], 1)

    def loss(out, y):
        return out.mean()

    r = estimate_traces(
        Diag(), [(torch.zeros(2, 5), torch.zeros(2))], method="hutchinson", loss=loss, max_probes=1, progress=False
    )
    assert r.layers[0].trace == pytest.approx(float(a.mean()), rel=1e-6)
    assert r.n_backward == 2 and r.layers[0].n_samples == 1


def test_deterministic_and_model_state_restored(tiny_cnn_case):
    model, x, y = tiny_cnn_case
    model.train()
    model.fc.bias.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    h = weights_hash(model)
    dicts = []
    for _ in range(2):
        r = estimate_traces(model, _repeat(x, y, 4, 3), method="mc_fisher", seed=7, progress=False)
        d = r.to_dict()
        d.pop("wall_s")
        dicts.append(dumps(d))
    assert dicts[0] == dicts[1]
    assert model.training and all(m.training for m in model.modules())
    assert not model.fc.bias.requires_grad and model.fc.weight.requires_grad
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert weights_hash(model) == h
    other = estimate_traces(model, _repeat(x, y, 4, 3), method="mc_fisher", seed=8, progress=False)
    assert other.to_dict()["layers"] != json.loads(dicts[0])["layers"]


def test_result_round_trips_through_json(tiny_mlp_case):
    model, x, y = tiny_mlp_case
    r = estimate_traces(model, _repeat(x, y, 8, 2), method="exact", progress=False)
    back = TraceResult.from_dict(json.loads(dumps(r.to_dict())))
    assert back == r
    assert set(r.history) == set(r.means()) and r.history["fc1"][-1][0] == r.n_images
    lt = LayerTrace("a", 3, 1.0, float("inf"), 1, False)
    assert LayerTrace.from_dict(json.loads(dumps(lt.to_dict()))) == lt


def test_stops_when_converged_and_respects_max_images(tiny_mlp_case):
    model, x, y = tiny_mlp_case
    loose = estimate_traces(model, _repeat(x, y, 8, 50), method="exact", rel_tol=0.5, progress=False, chunk_size=8)
    assert loose.converged and loose.n_images < 200
    tight = estimate_traces(
        model, _repeat(x, y, 8, 50), method="exact", rel_tol=1e-6, max_images=40, progress=False, chunk_size=8
    )
    assert tight.n_images == 40 and not tight.converged


def test_resume_from_state_equals_uninterrupted_run(tiny_cnn_case, tmp_path):
    model, x, y = tiny_cnn_case
    stream = _repeat(x, y, 4, 10)
    kw = dict(method="mc_fisher", seed=1, progress=False, chunk_size=4, rel_tol=1e-9)
    full = estimate_traces(model, stream, max_images=64, **kw)
    state = tmp_path / "traces_state.pt"
    estimate_traces(model, stream, max_images=24, state_path=state, **kw)  # "interrupted" after 24 images
    resumed = estimate_traces(model, stream, max_images=64, state_path=state, **kw)
    a, b = full.to_dict(), resumed.to_dict()
    a.pop("wall_s"), b.pop("wall_s")
    assert a == b


def test_user_errors_are_value_errors(tiny_mlp_case):
    model, x, y = tiny_mlp_case
    with pytest.raises(ValueError, match="not a layer"):
        estimate_traces(model, [(x, y)], ["nope"], progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        estimate_traces(model, [(x, y)], method="magic", progress=False)
    with pytest.raises(ValueError, match="empty"):
        estimate_traces(model, [], progress=False)
    with pytest.raises(ValueError, match="cross_entropy"):
        estimate_traces(model, [(x, y.double())], method="exact", loss="mse", progress=False)


def test_auto_picks_hybrid_for_relu_nets_and_gn_residual_for_gelu(tiny_mlp_case):
    model, x, y = tiny_mlp_case
    r = estimate_traces(model, [(x, y)], progress=False)
    assert r.method == "hybrid" and "piecewise linear" in r.reason and not r.notes
    gelu = nn.Sequential(nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 3)).double()
    r = estimate_traces(gelu, [(x, y)], progress=False, max_probes=4)
    assert r.method == "gn_residual" and "GELU" in r.reason and any("probed residual" in n for n in r.notes)
    r = estimate_traces(gelu, [(x, y)], method="exact", progress=False)
    assert any("Gauss-Newton approximates" in n for n in r.notes)


def test_op_without_double_backward_is_named_and_falls_back():
    class Once(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.clamp_min(0)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * (x > 0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.b(Once.apply(self.a(x)))

    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match="layers a go through an op without double backward"):
        estimate_traces(Net(), [(x, y)], method="hutchinson", progress=False)
    # auto on a curved net whose residual cannot be probed: Gauss-Newton traces, and one note saying so
    model = Net()
    model.b = nn.Sequential(nn.Tanh(), model.b)
    r = estimate_traces(model, [(x, y)], progress=False)
    assert r.method == "hybrid"
    assert len(r.notes) == 1 and "no double backward through layers a" in r.notes[0]
    assert "true Hessian trace may differ" in r.notes[0]


def test_a_chunk_too_big_for_memory_is_cut_with_the_same_values(tiny_cnn_case, monkeypatch):
    import hawq.hessian.estimate as E

    model, x, y = tiny_cnn_case
    full = estimate_traces(model, [(x, y)], method="exact", progress=False)
    seen, real = [], E.plan_chunk
    monkeypatch.setattr(E, "plan_chunk", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    monkeypatch.setattr(E, "available_memory_bytes", lambda device=None: 60_000)
    cut = estimate_traces(model, [(x, y)], method="exact", progress=False)
    assert seen and seen[0].images is not None and seen[0].images < x.shape[0]  # the chunk was cut
    for a, b in zip(full.layers, cut.layers):
        assert b.trace == pytest.approx(a.trace, rel=1e-12)
    monkeypatch.setattr(E, "available_memory_bytes", lambda device=None: 100)
    with pytest.raises(ValueError, match="one image needs about"):
        estimate_traces(model, [(x, y)], method="exact", progress=False)


def test_weights_hash_sees_weights_buffers_and_layers(tiny_cnn_case):
    model, _, _ = tiny_cnn_case
    h = weights_hash(model)
    assert weights_hash(model, ["conv1"]) != h
    model.bn1.running_mean.add_(1.0)
    h2 = weights_hash(model)
    assert h2 != h
    with torch.no_grad():
        model.fc.weight[0, 0] += 1e-6
    assert weights_hash(model) != h2


def test_resume_after_a_max_images_cut_inside_a_chunk(tiny_cnn_case, tmp_path):
    model, x, y = tiny_cnn_case  # 12 images
    kw = dict(method="exact", progress=False, chunk_size=4, rel_tol=1e-9)
    full = estimate_traces(model, [(x, y)], max_images=12, **kw)
    state = tmp_path / "cut.pt"
    estimate_traces(model, [(x, y)], max_images=10, state_path=state, **kw)  # stops inside the third chunk
    resumed = estimate_traces(model, [(x, y)], max_images=12, state_path=state, **kw)
    assert resumed.n_images == 12
    for a, b in zip(full.layers, resumed.layers):
        assert b.trace == pytest.approx(a.trace, rel=1e-12) and b.n_samples == a.n_samples


def test_stopping_above_rel_tol_warns(tiny_mlp_case):
    model, x, y = tiny_mlp_case
    with pytest.warns(UserWarning, match="stopped before reaching rel_tol=1e-06"):
        r = estimate_traces(model, [(x, y)], method="mc_fisher", rel_tol=1e-6, progress=False)
    assert not r.converged
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converged estimate says nothing
        assert estimate_traces(model, [(x, y)], method="exact", rel_tol=0.9, min_share=0.5, progress=False).converged
