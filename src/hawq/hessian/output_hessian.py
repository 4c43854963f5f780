"""Gauss-Newton traces for losses other than cross-entropy, from the loss's own output Hessian.

For a loss L(z) of the model's output z (the chunk mean of per-image losses L_i(z_i)), the Gauss-Newton
block of layer l is G_l = (1/B) sum_i J_il^T H_i J_il with H_i = d^2 L_i / dz_i^2. Softmax cross-entropy has
H_i in closed form (persample.py); here H_i comes from the loss itself, by Hessian-vector products at the
outputs only (no weight is involved, so they cost little beside the backward through the model).

Elementwise losses (RetinaNet's sigmoid focal classification loss and its L1 / smooth-L1 box loss, squared
error, binary cross-entropy) have a diagonal H_i: h = H 1, checked on every chunk against H r for a random
sign vector r (a loss that couples outputs is refused, and `auto` falls back to Hessian-vector products).
With h split into its positive and negative parts (the focal loss is not convex in its logits) and one
random sign s_k per output element,

    E_s ||J_il^T (s * sqrt(h+))||^2 - ||J_il^T (s * sqrt(h-))||^2 = sum_k h_k ||dz_k / dW_l||^2 = Tr(J_il^T H_i J_il),

two backward passes per image, unbiased; the sign noise is inside the per-image spread, so the standard
errors hold it. On a layer piecewise linear in its weights this is the Hessian trace; elsewhere
`gn_residual` adds the probed residual (residual.py), which needs only dL/dz and holds for any loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from hawq.hessian.hutchinson import LossFn, rademacher
from hawq.hessian.persample import ChunkPlan, recorded, sq_norms

DIAGONAL_RTOL = 1e-5  # |H r - h * r| <= this times max|h|, else the output Hessian couples outputs


class CoupledOutputsError(ValueError):
    """The loss's Hessian w.r.t. the model's output is not diagonal (it couples output elements)."""


def output_hessian_diagonal(z: Tensor, y: Tensor, loss_fn: LossFn, generator: torch.Generator) -> Tensor:
    """h = B * diag(d^2 L / dz^2) for the chunk-mean loss L (each image's own H_i), shaped like z, float64.

    Raises CoupledOutputsError when the Hessian is not diagonal (H r != h * r for a random sign vector r)."""
    zd = z.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(zd, y) * z.shape[0]  # the sum of the per-image losses
        (g,) = torch.autograd.grad(loss, zd, create_graph=True)
        if not g.requires_grad:  # the loss is piecewise linear in z (L1 alone): no curvature at the outputs
            return torch.zeros(z.shape, dtype=torch.float64)
        r = rademacher(z.shape, z, generator)
        h, hr = torch.autograd.grad(g, zd, torch.stack([torch.ones_like(zd), r]), is_grads_batched=True,
                                    allow_unused=True)[0]
    h, hr = h.detach().double().cpu(), hr.detach().double().cpu()
    tol = DIAGONAL_RTOL * float(h.abs().max().clamp_min(1e-30))
    if float((hr - h * r.detach().double().cpu()).abs().max()) > tol:
        raise CoupledOutputsError(
            "the loss's Hessian w.r.t. the model's output couples output elements (not elementwise): "
            "use method='hutchinson'")
    return h


def loss_gn_traces(
    model: nn.Module,
    modules: Sequence[nn.Module],
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    generator: torch.Generator,
    plan: ChunkPlan | None = None,
) -> tuple[Tensor, None, int]:
    """Per-image Gauss-Newton average traces (B, L) of an elementwise loss (module docstring), no diagonals,
    and the image-backward passes spent (two per image)."""
    plan = plan or ChunkPlan()
    step = plan.images or x.shape[0]
    if step < x.shape[0]:  # images are independent: cut the chunk to fit memory
        parts = [loss_gn_traces(model, modules, x[i : i + step], y[i : i + step], loss_fn, generator, plan)
                 for i in range(0, x.shape[0], step)]
        return torch.cat([v for v, _, _ in parts]), None, sum(k for _, _, k in parts)
    z, records = recorded(lambda: model(x), modules)
    if not isinstance(z, Tensor) or z.dim() < 1 or z.shape[0] != x.shape[0]:
        raise ValueError("Gauss-Newton traces of a custom loss need a model returning one tensor (B, ...): "
                         "use method='hutchinson'")
    missing = [i for i, r in enumerate(records) if not r]
    if missing:
        raise ValueError(f"layers {missing} were not called in the forward pass: check `layers`")
    h = output_hessian_diagonal(z, y, loss_fn, generator)
    s = rademacher(z.shape, h, generator)  # float64 on the CPU, like h
    B = x.shape[0]
    values = torch.zeros(B, len(modules), dtype=torch.float64)
    parts = [(sign, s * part.sqrt()) for sign, part in ((1.0, h.clamp_min(0)), (-1.0, (-h).clamp_min(0)))
             if bool((part > 0).any())]
    targets = [t for r in records for _, t in r]
    for k, (sign, u) in enumerate(parts):
        grads = torch.autograd.grad(z, targets, u.to(device=z.device, dtype=z.dtype),
                                    retain_graph=k + 1 < len(parts), allow_unused=True)
        j = 0
        for li, (m, r) in enumerate(zip(modules, records)):
            calls = [(inp, grads[j + c]) for c, (inp, _) in enumerate(r)]
            j += len(r)
            if any(g is None for _, g in calls):  # the output does not depend on this layer here
                continue
            calls = [(inp, g.unsqueeze(0)) for inp, g in calls]
            bdim = plan.batch_dims[li] if plan.batch_dims else 0
            norms, _ = sq_norms(m, calls, batch=B, bdim=bdim)
            values[:, li] += sign * norms.double().cpu() / m.weight.numel()
        del grads
    return values, None, 2 * B


def elementwise_loss(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn, generator: torch.Generator) -> str:
    """'' when the loss's output Hessian is diagonal on this batch (Gauss-Newton from it is possible), else why not."""
    with torch.no_grad():
        z = model(x)
    if not isinstance(z, Tensor) or z.dim() < 1 or z.shape[0] != x.shape[0]:
        return "the model's output is not one tensor (B, ...)"
    try:
        output_hessian_diagonal(z, y, loss_fn, generator)
    except CoupledOutputsError:
        return "the loss's output Hessian couples output elements"
    except RuntimeError as e:  # no double backward through the loss
        return f"no second derivative of the loss ({str(e).splitlines()[0][:80]})"
    return ""
