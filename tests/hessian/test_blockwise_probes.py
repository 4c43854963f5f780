"""The residual's probes are per layer: no cross-layer terms in a layer's value (residual.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hawq.hessian.hutchinson import probe_quadratic_forms
from hawq.hessian.residual import blockwise_quadratic_forms, probe_groups, residual_probes


def _quadratic(seed: int = 0):
    """Gradients of 1/2 t^T M t for two blocks a (3x2) and b (4,): M's diagonal blocks diagonal, its cross
    block large, so a Rademacher probe of one block alone has no noise at all."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    d_a, d_b = torch.rand(6, generator=g, dtype=torch.float64) + 0.5, -torch.rand(4, generator=g, dtype=torch.float64)
    cross = 5 * torch.randn(6, 4, generator=g, dtype=torch.float64)
    t = torch.cat([a.reshape(-1), b])
    m = torch.block_diag(torch.diag(d_a), torch.diag(d_b))
    m[:6, 6:], m[6:, :6] = cross, cross.T
    grads = torch.autograd.grad(0.5 * t @ m @ t, [a, b], create_graph=True)
    return grads, [a, b], float(d_a.mean()), float(d_b.mean())


def test_blockwise_probes_leave_out_the_cross_layer_terms():
    grads, params, tr_a, tr_b = _quadratic()
    est = blockwise_quadratic_forms(grads, params, 50, torch.Generator().manual_seed(1))
    # every probe is exact: v_l^T D_l v_l = Tr(D_l) for a diagonal D_l and signs v_l
    assert torch.allclose(est[:, 0], torch.full((50,), tr_a, dtype=torch.float64), rtol=1e-12)
    assert torch.allclose(est[:, 1], torch.full((50,), tr_b, dtype=torch.float64), rtol=1e-12)
    grads, params, _, _ = _quadratic()  # the graph again (the last probe frees it)
    joint = probe_quadratic_forms(grads, params, 50, torch.Generator().manual_seed(1))
    assert float(joint[:, 0].std()) > 0.5  # one probe over both blocks: the cross terms are its noise


def test_blockwise_probes_skip_layers_without_a_second_derivative():
    a = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    (ga,) = torch.autograd.grad((a**3).sum(), [a], create_graph=True)
    gb = torch.ones(2, dtype=torch.float64)  # linear in b: its gradient does not depend on b
    est = blockwise_quadratic_forms([ga, gb, None], [a, b, b], 3, torch.Generator().manual_seed(0))
    assert torch.allclose(est[:, 0], (6 * a.detach()).mean().expand(3))
    assert (est[:, 1:] == 0).all()


def test_residual_probes_of_one_weight_layers_have_no_probe_noise():
    # 1x1 weights: v_l^T R_ll v_l = R_ll for any sign, so each layer's own probe is exact; a probe over
    # both layers would add +-R_12, the noise this guards against
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Tanh(), torch.nn.Linear(1, 1), torch.nn.Tanh(),
                                torch.nn.Linear(1, 3)).double()
    x = torch.randn(16, 1, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    est = residual_probes(model, [model[0].weight, model[2].weight], x, y, F.cross_entropy, 6,
                          torch.Generator().manual_seed(0))
    assert float(est.abs().min()) > 0
    assert torch.allclose(est, est[:1].expand(6, 2), rtol=1e-10)


def test_probe_groups_are_contiguous_runs_covering_every_layer_once():
    assert [list(r) for r in probe_groups(5)] == [[0], [1], [2], [3], [4]]  # default: one layer per probe
    assert [list(r) for r in probe_groups(5, 16)] == [[0], [1], [2], [3], [4]]
    runs = probe_groups(40, 16)
    assert len(runs) == 16 and [i for r in runs for i in r] == list(range(40))
    assert {len(r) for r in runs} == {2, 3}


def test_one_probe_group_is_the_probe_over_all_layers():
    grads, params, _, _ = _quadratic()
    grouped = blockwise_quadratic_forms(grads, params, 5, torch.Generator().manual_seed(3), max_groups=1)
    grads, params, _, _ = _quadratic()
    joint = probe_quadratic_forms(grads, params, 5, torch.Generator().manual_seed(3))
    assert torch.allclose(grouped, joint, rtol=1e-12)
