"""Per-chunk kernels for activation traces: Tr(d^2 loss_i / d a_i^2) / numel(a_i) at each layer's input.

The loss Hessian w.r.t. a batch's activations is block-diagonal over images (eval mode: image i's loss
depends on image i's activation only), so the gradient of the *summed* loss w.r.t. image i's activation
is that image's own gradient, and one backward pass gives every image's contribution at once:
  * Gauss-Newton (cross-entropy, piecewise-linear net, exact): per class c, backward sqrt(p_ic)(p_i - e_c)
    to every layer's input; Tr = sum_c p_ic ||dCE(f(x_i), c)/da_i||^2.
  * Hutchinson (any loss/net): Rademacher v over the whole batch, v_i^T (H v)_i per image.
Each layer gets its own copy of its input (a forward pre-hook), so a tensor feeding two layers (a
residual block's conv and its shortcut) is perturbed for one layer at a time, as activation quantization
at that layer's input does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from hawq.hessian.hutchinson import LossFn, rademacher
from hawq.hessian.persample import capture_io, gn_backward, hybrid_split, recorded


def input_numels(model: nn.Module, modules: Sequence[nn.Module], x: Tensor) -> list[int]:
    """numel of one image's input to each layer (summed over calls if a layer is called twice)."""
    with capture_io(modules) as records, torch.no_grad():
        model(x[:1])
    return [sum(inp[0].numel() for inp, _ in r) for r in records]


def input_numels_from(records) -> list[int]:
    return [sum(inp[0].numel() for inp, _ in r) for r in records]


def act_persample(
    model: nn.Module, modules: Sequence[nn.Module], x: Tensor, mode: str, generator: torch.Generator | None
) -> tuple[Tensor, int]:
    """(B, L) per-image Gauss-Newton average traces w.r.t. each layer's input; backward passes spent."""
    if mode == "hybrid":
        values, spent = torch.empty(x.shape[0], len(modules), dtype=torch.float64), 0
        hard, easy, uncertain_mode = hybrid_split(model, x)
        for idx, sub in ((hard, uncertain_mode), (easy, "mc_fisher_is")):
            if len(idx):
                values[idx], k = act_persample(model, modules, x[idx], sub, generator)
                spent += k
        return values, spent
    values = torch.zeros(x.shape[0], len(modules), dtype=torch.float64)
    k_vectors = 0
    for records, grads, k in gn_backward(model, modules, x, mode, generator, wrt_input=True):
        k_vectors += k
        j = 0
        for li, r in enumerate(records):
            for _ in r:
                g = grads[j].flatten(2)  # (K, B, numel)
                values[:, li] += (g.double() ** 2).sum(dim=(0, 2)).to(values.device)
                j += 1
    n = input_numels_from(records)
    values /= torch.tensor(n, dtype=torch.float64)
    return values, k_vectors


def act_hutchinson(
    model: nn.Module,
    modules: Sequence[nn.Module],
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    n_probes: int,
    generator: torch.Generator,
) -> tuple[Tensor, int]:
    """(B, L) per-image Hutchinson estimates (mean over n_probes) w.r.t. each layer's input."""
    B = x.shape[0]
    # summed over images: per-image gradients (mean-reduced loss_fn)
    loss, records = recorded(lambda: loss_fn(model(x), y) * B, modules, grad_input=True)
    acts = [a for r in records for a, _ in r]
    with torch.enable_grad():
        grads = torch.autograd.grad(loss, acts, create_graph=True)
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    values = torch.zeros(B, len(modules), dtype=torch.float64)
    owner = [li for li, r in enumerate(records) for _ in r]
    numel = [0] * len(modules)
    for a, li in zip(acts, owner):
        numel[li] += a[0].numel()
    for k in range(n_probes):
        vs = [rademacher(a.shape, a, generator) for a in acts]
        if not live:
            continue
        hv = torch.autograd.grad(
            [grads[i] for i in live],
            acts,
            [vs[i] for i in live],
            retain_graph=k < n_probes - 1,
            allow_unused=True,
        )
        for v, h, li in zip(vs, hv, owner):
            if h is not None:
                values[:, li] += (v.double() * h.double()).flatten(1).sum(1).to(values.device)
    values /= torch.tensor(numel, dtype=torch.float64) * n_probes
    return values, 1 + n_probes
