"""The curved part of a layer's Hessian trace, probed: Tr(H_l - G_l) by Hutchinson on a control variate.

For a loss L(z(theta)) of logits z, H = J^T (d^2 L / dz^2) J + sum_c (dL/dz_c) d^2 z_c / dtheta^2 = G + R.
The Gauss-Newton part G is summed exactly from per-sample gradients (persample.py); only the residual R is
left to random probes, and R is the Hessian of s(theta) = <stop_grad(dL/dz), z(theta)>, so one
Hessian-vector product of s per probe gives v_l . (R v)_l with no Jacobian-vector product. On a curved
net the residual's per-probe variance is far below that of v . H v (docs/design.md: 67-518x on a trained
GELU/LayerNorm/SiLU MLP), and Tr(G_l) + E[v_l . (R v)_l] is unbiased for Tr(H_l). Probes cover the
curved layers only: on a layer proved piecewise linear R_ll = 0.

Each layer gets its own probe and its own second backward (`blockwise_quadratic_forms`): v_l . (R_ll v_l)
from the gradient of <grad_l s, v_l> w.r.t. W_l alone. One probe v over all layers at once would add the
cross-layer terms v_l . R_lk v_k (k != l) to layer l's value: zero in expectation, but on the trained
nets of bench/curved.py they multiplied the per-probe variance by 8-39x (median over layers; up to 1280x on
one layer), while the L partial backward passes cost 2.9-3.5x one full one (each stops at its own layer's
weight; docs/curved.md). On deep torchvision nets with random weights (docs/probe_groups.md) a per-layer
probe costs 15-30x one probe over all layers, and pays: on convnext_tiny 18 of 58 curved layers get an
exact value from every probe (their own block has no off-diagonal part) and the others 21x less variance
(median); on efficientnet_b0 67 of 81 are exact and the others ~7e8x less variance. Runs of layers sharing a
probe keep most of the cross terms (16 runs: 5x and 1.5e7x at 4-6x the time).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from hawq.hessian.hutchinson import LossFn, rademacher


class _TwiceDifferentiable(TorchFunctionMode):
    """Ops whose double backward PyTorch lacks, rewritten as the same function of ops that have it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.hardsigmoid:  # relu6(x + 3) / 6, piecewise linear: the same values and derivatives
            return F.relu6(args[0] + 3) / 6
        return func(*args, **kwargs)


@contextmanager
def twice_differentiable():
    with _TwiceDifferentiable():
        yield


def residual_probes(
    model: nn.Module,
    params: Sequence[Tensor],
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    n_probes: int,
    generator: torch.Generator,
) -> Tensor:
    """(n_probes, L) estimates v_l . (R_ll v_l) / n_l of the chunk-mean loss's residual average traces."""
    return blockwise_quadratic_forms(residual_gradients(model, params, x, y, loss_fn), params, n_probes, generator)


def residual_gradients(model: nn.Module, params: Sequence[Tensor], x: Tensor, y: Tensor,
                       loss_fn: LossFn) -> tuple[Tensor | None, ...]:
    """Gradients of s = <stop_grad(dL/dz), z> w.r.t. `params`, built with create_graph: their Jacobian is R."""
    with torch.enable_grad(), twice_differentiable():
        z = model(x)
        zd = z.detach().requires_grad_(True)
        (r,) = torch.autograd.grad(loss_fn(zd, y), zd)  # dL/dz of the chunk-mean loss
        return torch.autograd.grad((r * z).sum(), params, create_graph=True, allow_unused=True)


def probe_groups(n: int, max_groups: int | None = None) -> list[range]:
    """0..n-1 cut into min(n, max_groups) contiguous runs of near-equal length (None: one run per layer)."""
    k = max(1, n if max_groups is None else min(n, max_groups))
    return [range(n * j // k, n * (j + 1) // k) for j in range(k)]


def blockwise_quadratic_forms(
    grads: Sequence[Tensor | None], params: Sequence[Tensor], n_probes: int, generator: torch.Generator,
    max_groups: int | None = None,
) -> Tensor:
    """(n_probes, L) values v_l . (M v)_l / n_l with v zero outside l's group: by default one layer per group,
    v_l . (M_ll v_l), a Rademacher v_l and a second backward per layer (`max_groups`: contiguous runs of
    layers share a probe, bench/probe_groups.py). `grads` (built with create_graph) are the gradients whose
    Jacobian w.r.t. `params` is M. Unbiased for Tr(M_ll) / n_l, without the cross terms between groups that
    one probe over all layers would add."""
    out = torch.zeros(n_probes, len(params), dtype=torch.float64)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]  # others: M_ll = 0
    groups = [[live[j] for j in run] for run in probe_groups(len(live), max_groups)] if live else []
    for k in range(n_probes):
        vs = [rademacher(p.shape, p, generator) for p in params]  # drawn for every layer: the same draws
        for gi, group in enumerate(groups):
            last = k == n_probes - 1 and gi == len(groups) - 1
            hs = torch.autograd.grad([grads[i] for i in group], [params[i] for i in group], [vs[i] for i in group],
                                     retain_graph=not last, allow_unused=True)
            for i, h in zip(group, hs):
                if h is not None:
                    out[k, i] = float((vs[i].double() * h.double()).sum()) / vs[i].numel()
    return out


def residual_unreachable(model: nn.Module, names: Sequence[str], params: Sequence[Tensor], x: Tensor, y: Tensor,
                         loss_fn: LossFn) -> list[str]:
    """Curved layers whose residual cannot be probed: the second backward raises, or comes back empty (what a
    `once_differentiable` autograd Function silently gives)."""
    try:
        grads = residual_gradients(model, params, x, y, loss_fn)
    except RuntimeError:
        return list(names)
    # curved layers' gradients depend on their weights; one that does not went through an op that hides its
    # double backward (once_differentiable)
    bad = [n for n, g in zip(names, grads) if g is None or not g.requires_grad]
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not live:
        return bad
    try:  # one second backward for all layers at once; per layer only if that fails
        hs = torch.autograd.grad([grads[i] for i in live], params, [torch.ones_like(grads[i]) for i in live],
                                 retain_graph=True, allow_unused=True)
        return bad + [names[i] for i in live if hs[i] is None]
    except RuntimeError:
        pass
    for i in live:
        try:
            (h,) = torch.autograd.grad(grads[i], params[i], torch.ones_like(grads[i]), retain_graph=True,
                                       allow_unused=True)
        except RuntimeError:
            h = None
        if h is None:
            bad.append(names[i])
    return bad
