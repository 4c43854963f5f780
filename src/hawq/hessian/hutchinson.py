"""Hutchinson estimates of per-layer Hessian traces with true Hessian-vector products.

Tr(H_l) = E_v[v_l^T (H v)_l] for Rademacher v over all layers jointly (cross-layer terms have mean zero).
The gradient graph is built once per batch (create_graph=True) and reused by every probe; works for any
loss and network whose ops have a double backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]


class NoDoubleBackwardError(ValueError):
    """Some op on the path of these layers has no second derivative."""

    def __init__(self, layers: Sequence[str], cause: str) -> None:
        self.layers = list(layers)
        super().__init__(
            f"layers {', '.join(self.layers) or '(unknown)'} go through an op without double backward "
            f"({cause}); Hessian-vector products are impossible there: use method='exact' (Gauss-Newton, "
            "cross-entropy) or replace the op"
        )


IGNORE_INDEX = -100  # targets equal to this are left out (PyTorch's convention)


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of logits (B, C) with targets (B,), or of sequences: logits (B, T, C) with targets (B, T),
    one sequence one sample: each sequence's loss is the mean over its tokens (targets `IGNORE_INDEX` left
    out), the loss the mean over sequences (equal to F.cross_entropy over all tokens when every sequence
    has the same number of counted tokens)."""
    if logits.dim() == 3 and target.dim() == 2:
        if target.shape != logits.shape[:2]:
            raise ValueError(f"sequence targets {tuple(target.shape)} do not match logits {tuple(logits.shape)}: "
                             "pass targets (B, T) for logits (B, T, C)")
        per_token = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none")
        counted = (target != IGNORE_INDEX).sum(1).clamp_min(1)
        return (per_token.sum(1) / counted).mean()
    return F.cross_entropy(logits, target)  # (B, C) or PyTorch's other forms, e.g. (B, C, H, W) with (B, H, W)


def resolve_loss(loss: str | LossFn) -> LossFn:
    if callable(loss):
        return loss
    if loss == "cross_entropy":
        return cross_entropy
    if loss == "mse":
        return F.mse_loss
    raise ValueError(f"unknown loss {loss!r}: use 'cross_entropy', 'mse' or a callable(output, target)")


def rademacher(shape: torch.Size, like: Tensor, generator: torch.Generator) -> Tensor:
    return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(like.dtype).to(like.device)


def hvp_probes(
    model: nn.Module,
    params: Sequence[Tensor],
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    n_probes: int,
    generator: torch.Generator,
) -> Tensor:
    """(n_probes, L) estimates v_l^T (H v)_l / n_l of the batch-mean loss's average traces."""
    with torch.enable_grad():
        loss = loss_fn(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
    return probe_quadratic_forms(grads, params, n_probes, generator)


def probe_quadratic_forms(
    grads: Sequence[Tensor | None], params: Sequence[Tensor], n_probes: int, generator: torch.Generator
) -> Tensor:
    """(n_probes, L) values v_l . (M v)_l / n_l for Rademacher v, where `grads` (built with create_graph) are
    the gradients whose Jacobian w.r.t. `params` is M (the loss's Hessian, or the residual's)."""
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]  # others: M_l = 0
    out = torch.zeros(n_probes, len(params), dtype=torch.float64)
    for k in range(n_probes):
        vs = [rademacher(p.shape, p, generator) for p in params]
        if not live:
            continue
        hv = torch.autograd.grad(
            [grads[i] for i in live], params, [vs[i] for i in live], retain_graph=k < n_probes - 1, allow_unused=True
        )
        for li, (v, h) in enumerate(zip(vs, hv)):
            if h is not None:
                out[k, li] = float((v.double() * h.double()).sum()) / v.numel()
    return out


def find_no_double_backward(
    model: nn.Module, names: Sequence[str], params: Sequence[Tensor], x: Tensor, y: Tensor, loss_fn: LossFn
) -> list[str]:
    """Layers whose own Hessian block cannot be reached: the HVP raises, or comes back empty (what a
    `once_differentiable` autograd Function silently gives)."""
    bad = []
    with torch.enable_grad():
        loss = loss_fn(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
    for name, g, p in zip(names, grads, params):
        try:
            h = None
            if g.requires_grad:
                (h,) = torch.autograd.grad(g, p, torch.ones_like(g), retain_graph=True, allow_unused=True)
            if h is None:
                bad.append(name)
        except RuntimeError:
            bad.append(name)
    return bad
