"""Per-sample Gauss-Newton traces of Conv2d/Linear weight blocks (exact and Monte-Carlo Fisher).

For a network piecewise linear in each layer's weights, with cross-entropy and softmax output p_i, the
diagonal Hessian block of layer l equals its Gauss-Newton block, and

    Tr(H_l) = (1/B) sum_i sum_c p_ic || grad_{W_l} CE(f(x_i), c) ||^2          (DESIGN.md)

grad_{W_l} CE(f(x_i), c) = sum_t g_ict a_it^T, with g the gradient w.r.t. the layer's output at position t
(one backward pass from the logits with grad_output p_i - e_c, which never computes weight gradients) and
a the (unfolded) input. Its squared norm is formed either by materializing the per-sample gradient
(cost O*D*T) or by the Gram ("ghost norm") identity ||sum_t g_t a_t^T||^2 = sum_ts (g_t.g_s)(a_t.a_s)
(cost T^2*(O+D), the input Gram shared by all classes), whichever is cheaper for the layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@contextmanager
def capture_io(modules: Sequence[nn.Module], grad_input: bool = False):
    """Record every call of each module: (input detached, output in the graph) in `records[k]`.

    With grad_input=True the input is replaced by a fresh autograd node owned by the layer alone, so
    gradients w.r.t. it are those of *this layer's* input (what activation quantization perturbs).
    """
    records: list[list[tuple[Tensor, Tensor]]] = [[] for _ in modules]
    handles = []
    for k, m in enumerate(modules):
        if grad_input:

            def pre(mod, args, k=k):
                x = args[0]
                x = x.view_as(x) if x.requires_grad else x.detach().requires_grad_(True)
                records[k].append((x, x))
                return (x, *args[1:])

            handles.append(m.register_forward_pre_hook(pre))
        else:

            def post(mod, args, out, k=k):
                records[k].append((args[0].detach(), out))

            handles.append(m.register_forward_hook(post))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def _conv_unfold(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C*kh*kw, T): the patches conv multiplies its weight with."""
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding: Any = 0
    elif isinstance(conv.padding, str):
        if conv.padding == "valid":
            padding = 0
        else:  # "same": possibly asymmetric, pad explicitly as conv does
            pads = []
            for d, k in zip(reversed(conv.dilation), reversed(conv.kernel_size)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
            padding = 0
    else:
        padding = conv.padding
    return F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)


def _layer_operands(m: nn.Module, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor, int]:
    """Return a (B, G, D, T) and g (K, B, G, O/G, T) for input x and output gradients g (K, B, ...)."""
    K, B = g.shape[0], g.shape[1]
    if isinstance(m, nn.Conv2d):
        groups = m.groups
        a = _conv_unfold(m, x)  # (B, C*kh*kw, T)
        a = a.reshape(B, groups, a.shape[1] // groups, a.shape[2])
        g = g.reshape(K, B, groups, m.out_channels // groups, -1)
    elif isinstance(m, nn.Linear):
        groups = 1
        a = x.reshape(B, -1, x.shape[-1]).transpose(1, 2).unsqueeze(1)  # (B, 1, I, T)
        g = g.reshape(K, B, -1, g.shape[-1]).transpose(2, 3).unsqueeze(2)  # (K, B, 1, O, T)
    else:
        raise ValueError(
            f"per-sample traces support Conv2d and Linear layers, not {type(m).__name__}: "
            "pass method='hutchinson' or leave that layer out of `layers`"
        )
    return a, g, groups


def sq_norms(
    m: nn.Module, calls: Sequence[tuple[Tensor, Tensor]], force_materialize: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Per-sample squared gradient norms of m.weight summed over the K backward vectors.

    calls: [(input (B, ...), grad_output (K, B, ...)), ...] for every call of m in the forward.
    Returns (norms (B,), diag (O, D) summed over samples and K, or None unless force_materialize).
    """
    ops = [_layer_operands(m, x, g) for x, g in calls]
    a0, g0, _ = ops[0]
    K, B, G, Og, T = g0.shape
    D = a0.shape[2]
    materialize = force_materialize or len(calls) > 1 or Og * D * T <= T * T * (Og + D / K)
    if materialize:
        grad = None
        for a, g, _ in ops:
            part = torch.einsum("kbgot,bgdt->kbgod", g, a)  # per-sample weight gradients
            grad = part if grad is None else grad + part
        sq = grad * grad
        norms = sq.sum(dim=(0, 2, 3, 4))
        diag = sq.sum(dim=(0, 1)).reshape(G * Og, D) if force_materialize else None
        return norms, diag
    a, g, _ = ops[0]
    gram_a = a.transpose(2, 3) @ a  # (B, G, T, T), shared by the K classes
    gk = g.permute(1, 2, 4, 0, 3).reshape(B, G, T, K * Og)
    gram_g = gk @ gk.transpose(2, 3)  # (B, G, T, T), summed over the K classes
    return (gram_a * gram_g).sum(dim=(1, 2, 3)), None


def output_grad_vectors(logits: Tensor, mode: str, generator: torch.Generator | None) -> Tensor:
    """Backward vectors u (K, B, C) with sum_k ||J^T u_k||^2 = the Gauss-Newton quadratic form.

    exact: K = C, u_c = sqrt(p_c) (p - e_c), summing p_c ||grad CE(., c)||^2 over classes.
    mc_fisher: K = 1, u = p - e_c with one label c ~ p per image (unbiased for the same sum).
    """
    # on the CPU: the label generator is a CPU torch.Generator (same draws on every device)
    p = torch.softmax(logits.detach().double().cpu(), dim=-1)  # (B, C)
    B, C = p.shape
    if mode == "exact":
        eye = torch.eye(C, dtype=p.dtype)
        u = (p.unsqueeze(0) - eye.unsqueeze(1)) * p.T.sqrt().unsqueeze(-1)  # (C, B, C)
    elif mode == "mc_fisher":
        c = torch.multinomial(p, 1, generator=generator).squeeze(1)  # (B,)
        u = (p - F.one_hot(c, C).to(p.dtype)).unsqueeze(0)  # (1, B, C)
    elif mode == "mc_fisher_is":
        # importance sampling: q_c ~ p_c ||p - e_c||^2, weight p_c / q_c (unbiased; if ||J^T u|| ~ ||u||,
        # every label gives nearly the same value and the label noise vanishes)
        q = p * ((p * p).sum(1, keepdim=True) - 2 * p + 1) + 1e-30
        q = q / q.sum(1, keepdim=True)
        c = torch.multinomial(q, 1, generator=generator).squeeze(1)
        w = (p.gather(1, c[:, None]) / q.gather(1, c[:, None])).sqrt()  # (B, 1)
        u = ((p - F.one_hot(c, C).to(p.dtype)) * w).unsqueeze(0)
    else:
        raise ValueError(f"unknown per-sample mode {mode!r}")
    return u.to(device=logits.device, dtype=logits.dtype)


def gn_backward(
    model: nn.Module,
    modules: Sequence[nn.Module],
    x: Tensor,
    mode: str,
    generator: torch.Generator | None,
    wrt_input: bool = False,
) -> tuple[list[list[tuple[Tensor, Tensor]]], list[Tensor], int]:
    """Forward x, then backward the K vectors of `output_grad_vectors` to each layer's output (or its
    own input, wrt_input=True). Returns (records, grads (K, B, ...) in record order, K)."""
    with capture_io(modules, grad_input=wrt_input) as records, torch.enable_grad():
        logits = model(x)
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError("per-sample traces need a model returning logits (B, C): use method='hutchinson'")
    missing = [i for i, r in enumerate(records) if not r]
    if missing:
        raise ValueError(f"layers {missing} were not called in the forward pass: check `layers`")
    u = output_grad_vectors(logits, mode, generator)  # (K, B, C)
    targets = [t for r in records for _, t in r]
    if u.shape[0] == 1:
        grads = [g.unsqueeze(0) for g in torch.autograd.grad(logits, targets, grad_outputs=u[0])]
    else:
        grads = list(torch.autograd.grad(logits, targets, grad_outputs=u, is_grads_batched=True))
    return records, grads, u.shape[0]


# hybrid: images with 1 - ||p||^2 >= this get the exact sum over classes, the others one importance-sampled
# class. Uncertain images carry the heavy tail of per-image traces (up to ~1000x the mean), where label
# noise would dominate; ~10% of images on ResNet-20/Fashion-MNIST (measured, bench/trace.py).
HYBRID_UNCERTAINTY = 0.5


def hybrid_split(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Indices of (uncertain, confident) images of a chunk, from one forward pass without gradients."""
    with torch.no_grad():
        p = torch.softmax(model(x).double(), dim=-1)
    hard = ((1 - (p * p).sum(1)) >= HYBRID_UNCERTAINTY).cpu()  # CPU indices: they index CPU results too
    return hard.nonzero().squeeze(1), (~hard).nonzero().squeeze(1)


def persample_traces(
    model: nn.Module,
    modules: Sequence[nn.Module],
    x: Tensor,
    mode: str,
    generator: torch.Generator | None = None,
    diagonal: bool = False,
) -> tuple[Tensor, list[Tensor] | None, int]:
    """Per-image Gauss-Newton average traces for one chunk of images.

    Returns (values (B, L) float64 with values[i, l] = sum_c p_ic ||grad_{W_l} CE_ic||^2 / n_l (or an
    unbiased one-label estimate of it), per-layer diagonal sums (or None), backward passes spent).
    """
    if mode == "hybrid":
        values = torch.empty(x.shape[0], len(modules), dtype=torch.float64)
        diags: list[Tensor] | None = None
        spent = 0
        for idx, sub in zip(hybrid_split(model, x), ("exact", "mc_fisher_is")):
            if len(idx):
                v, d, k = persample_traces(model, modules, x[idx], sub, generator, diagonal)
                values[idx] = v
                diags = d if diags is None or d is None else [a + b for a, b in zip(diags, d)]
                spent += k
        return values, diags, spent
    records, grads, k_vectors = gn_backward(model, modules, x, mode, generator)
    values = torch.empty(x.shape[0], len(modules), dtype=torch.float64)
    diags = [] if diagonal else None
    j = 0
    for li, (m, r) in enumerate(zip(modules, records)):
        calls = [(inp, grads[j + k]) for k, (inp, _) in enumerate(r)]
        j += len(r)
        norms, diag = sq_norms(m, calls, force_materialize=diagonal)
        values[:, li] = norms.double() / m.weight.numel()
        if diags is not None:
            diags.append(diag.reshape(m.weight.shape).double())
    return values, diags, k_vectors


def chunk_memory_bytes(model: nn.Module, modules: Sequence[nn.Module], x: Tensor, n_vectors: int) -> int:
    """Rough peak bytes of one chunk: the layer-output gradients for all backward vectors."""
    with capture_io(modules) as records, torch.no_grad():
        model(x[:1])
    per_image = sum(out.numel() for r in records for _, out in r)
    return int(per_image * x.shape[0] * n_vectors * x.element_size() * 3)


def check_memory(nbytes: int, limit_bytes: int | None, chunk_size: int) -> None:
    if limit_bytes is not None and nbytes > limit_bytes:
        smaller = max(1, int(chunk_size * limit_bytes / nbytes))
        raise ValueError(
            f"one chunk needs about {nbytes / 2**30:.1f} GiB for the per-class gradients, more than "
            f"{limit_bytes / 2**30:.1f} GiB available: pass chunk_size={smaller} (or smaller)"
        )


def available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
