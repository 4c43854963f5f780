"""Per-sample Gauss-Newton traces of Conv2d/Linear weight blocks (exact and Monte-Carlo Fisher).

For a network piecewise linear in each layer's weights, with cross-entropy and softmax output p_i, the
diagonal Hessian block of layer l equals its Gauss-Newton block, and

    Tr(H_l) = (1/B) sum_i sum_c p_ic || grad_{W_l} CE(f(x_i), c) ||^2          (docs/design.md)

grad_{W_l} CE(f(x_i), c) = sum_t g_ict a_it^T, with g the gradient w.r.t. the layer's output at position t
(one backward pass from the logits with grad_output p_i - e_c, which never computes weight gradients) and
a the (unfolded) input. Its squared norm is formed either by materializing the per-sample gradient
(cost O*D*T) or by the Gram ("ghost norm") identity ||sum_t g_t a_t^T||^2 = sum_ts (g_t.g_s)(a_t.a_s)
(cost T^2*(O+D), the input Gram shared by all classes), whichever is cheaper for the layer.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Records(list):
    """records[k]: the calls of module k as (input, output); `watch` the captured tensors with their version
    counters at capture time, so that an op changing one in place afterwards (ReLU(inplace=True) after a
    conv, `out += x`) is seen: the output then holds the next op's result and gradients w.r.t. it skip
    that op (a ReLU's mask), the input holds other values than the layer saw."""

    def __init__(self, n: int) -> None:
        super().__init__([] for _ in range(n))
        self.watch: list[tuple[Tensor, int]] = []

    def modified(self) -> bool:
        return any(t._version != v for t, v in self.watch)


@contextmanager
def capture_io(modules: Sequence[nn.Module], grad_input: bool = False, copy: bool = False):
    """Record every call of each module: (input detached, output in the graph) in `records[k]`.

    With grad_input=True the input is replaced by a fresh autograd node owned by the layer alone, so
    gradients w.r.t. it are those of *this layer's* input (what activation quantization perturbs).
    With copy=True the recorded tensors are the layer's own and the network goes on with copies, so no later
    in-place op can change them (use `recorded`, which takes this path only where it is needed).
    """
    records = Records(len(modules))
    handles = []
    for k, m in enumerate(modules):
        if grad_input:

            def pre(mod, args, k=k):
                x = args[0]
                records.watch.append((x, x._version))
                if copy:
                    x = x.clone() if x.requires_grad else x.detach().clone().requires_grad_(True)
                else:
                    x = x.view_as(x) if x.requires_grad else x.detach().requires_grad_(True)
                records[k].append((x, x))
                return (x, *args[1:])

            handles.append(m.register_forward_pre_hook(pre))
        else:

            def post(mod, args, out, k=k):
                inp = args[0].detach()
                records[k].append((inp.clone() if copy else inp, out))
                records.watch += [(t, t._version) for t in (inp, out) if isinstance(t, Tensor)]
                return out.clone() if copy and isinstance(out, Tensor) else None

            handles.append(m.register_forward_hook(post))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def recorded(fn, modules: Sequence[nn.Module], grad_input: bool = False) -> tuple[Any, Records]:
    """fn() (a forward pass, with grad) under `capture_io`; run again with copies (copy=True) when an op changed a
    recorded tensor in place, so gradients w.r.t. the records are those of the layers themselves."""
    key = modules[0] if modules else None
    for copy in (True,) if key is not None and key in _NEEDS_COPY else (False, True):
        with capture_io(modules, grad_input, copy) as records, torch.enable_grad():
            out = fn()
        if copy or not records.modified():
            return out, records
        if key is not None:
            _NEEDS_COPY[key] = True  # the next chunks of this model go straight to copies
    raise AssertionError("unreachable")


_NEEDS_COPY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # first layer -> copies needed


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


def _layer_operands(m: nn.Module, x: Tensor, g: Tensor, batch: int, bdim: int = 0) -> tuple[Tensor, Tensor, int]:
    """Return a (B, G, D, T) and g (K, B, G, O/G, T) for input x and output gradients g (K, ...).

    `bdim` is the dim of x that indexes the `batch` images (1 for a sequence-first (T, B, I) input); a
    leading dim of B*T rows (batch folded in, image-major) is grouped by image.
    """
    K, B = g.shape[0], batch
    if isinstance(m, nn.Conv2d):
        groups = m.groups
        a = _conv_unfold(m, x)  # (N, C*kh*kw, P) with N = B or B*T
        n = a.shape[0] // B
        if n > 1:  # images folded into the batch dim: one image's rows are consecutive
            a = a.reshape(B, n, a.shape[1], a.shape[2]).transpose(1, 2).reshape(B, a.shape[1], -1)
            g = g.reshape(K, B, n, m.out_channels, -1).transpose(2, 3)
        a = a.reshape(B, groups, a.shape[1] // groups, a.shape[2])
        g = g.reshape(K, B, groups, m.out_channels // groups, -1)
    elif isinstance(m, nn.Linear):
        groups = 1
        x, g = x.movedim(bdim, 0), g.movedim(bdim + 1, 1)
        a = x.reshape(B, -1, x.shape[-1]).transpose(1, 2).unsqueeze(1)  # (B, 1, I, T)
        g = g.reshape(K, B, -1, g.shape[-1]).transpose(2, 3).unsqueeze(2)  # (K, B, 1, O, T)
    else:
        raise ValueError(
            f"per-sample traces support Conv2d and Linear layers, not {type(m).__name__}: "
            "pass method='hutchinson' or leave that layer out of `layers`"
        )
    return a, g, groups


def sq_norms(
    m: nn.Module,
    calls: Sequence[tuple[Tensor, Tensor]],
    force_materialize: bool = False,
    batch: int | None = None,
    bdim: int = 0,
) -> tuple[Tensor, Tensor | None]:
    """Per-sample squared gradient norms of m.weight summed over the K backward vectors.

    calls: [(input, grad_output (K, ...)), ...] for every call of m in the forward; `batch` images (default:
    the grad's dim 1), indexed by dim `bdim` of the input.
    Returns (norms (B,), diag (O, D) summed over samples and K, or None unless force_materialize).
    """
    batch = calls[0][1].shape[1] if batch is None else batch
    ops = [_layer_operands(m, x, g, batch, bdim) for x, g in calls]
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


# Many classes: summing over all C classes costs C backward vectors per image. Above EXACT_CLASSES, the
# TOP_CLASSES most probable classes of an image are summed exactly and TAIL_SAMPLES of the others drawn by
# importance sampling (q_c ~ p_c ||p - e_c||^2 over the tail, weighted by p_c / q_c): unbiased, and
# TOP_CLASSES + TAIL_SAMPLES backward vectors per image whatever C is.
EXACT_CLASSES = 16
TOP_CLASSES = 8
TAIL_SAMPLES = 4


def _is_weights(p: Tensor) -> Tensor:
    """q_c ~ p_c ||p - e_c||^2, the importance distribution over classes (rows of p)."""
    q = p * ((p * p).sum(1, keepdim=True) - 2 * p + 1) + 1e-30
    return q / q.sum(1, keepdim=True)


def output_grad_vectors(logits: Tensor, mode: str, generator: torch.Generator | None,
                        counted: Tensor | None = None) -> Tensor:
    """Backward vectors u (K, B, C) with sum_k ||J^T u_k||^2 = the Gauss-Newton quadratic form.

    Sequences (logits (B, T, C), one sequence one sample, its loss the mean over its `counted` tokens
    (B, T) bool, default all): u (K, B, T, C) holds each token's vector of `mode` divided by sqrt(n_b) and,
    when T > 1, times an independent random sign per token and vector, so that the cross terms between
    tokens vanish in expectation: E ||J^T u_k||^2 = sum_t ||J^T u_kt||^2 (unbiased, not exact).

    exact: K = C, u_c = sqrt(p_c) (p - e_c), summing p_c ||grad CE(., c)||^2 over classes.
    top_is: K = TOP_CLASSES + TAIL_SAMPLES: the top classes exactly, the tail importance-sampled (unbiased).
    mc_fisher: K = 1, u = p - e_c with one label c ~ p per image (unbiased for the same sum).
    mc_fisher_is: K = 1, one label from q_c ~ p_c ||p - e_c||^2, weighted by p_c / q_c (unbiased).
    """
    if logits.dim() == 3:
        B, T, C = logits.shape
        u = output_grad_vectors(logits.reshape(B * T, C), mode, generator)  # (K, B*T, C)
        u = u.reshape(u.shape[0], B, T, C)
        keep = torch.ones(B, T, dtype=torch.bool) if counted is None else counted.cpu().bool()
        scale = keep.double() / keep.sum(1, keepdim=True).clamp_min(1).double().sqrt()  # (B, T)
        if T > 1:
            signs = torch.randint(0, 2, (u.shape[0], B, T), generator=generator).double() * 2 - 1
            scale = scale * signs
        return u * scale.unsqueeze(-1).to(device=u.device, dtype=u.dtype)
    # on the CPU: the label generator is a CPU torch.Generator (same draws on every device)
    p = torch.softmax(logits.detach().double().cpu(), dim=-1)  # (B, C)
    B, C = p.shape
    if mode == "top_is" and C <= TOP_CLASSES + TAIL_SAMPLES:
        mode = "exact"
    if mode == "exact":
        eye = torch.eye(C, dtype=p.dtype)
        u = (p.unsqueeze(0) - eye.unsqueeze(1)) * p.T.sqrt().unsqueeze(-1)  # (C, B, C)
    elif mode == "top_is":
        top = p.topk(TOP_CLASSES, dim=1).indices  # (B, k)
        tail = p.scatter(1, top, 0.0)
        q = _is_weights(tail) * (tail > 0)
        q = q / q.sum(1, keepdim=True).clamp_min(1e-300)
        drawn = torch.multinomial(q + 1e-300 * (q.sum(1, keepdim=True) == 0), TAIL_SAMPLES, replacement=True,
                                  generator=generator)  # (B, m)
        cls = torch.cat([top, drawn], 1)  # (B, K)
        pc = p.gather(1, cls)
        tail_w = pc[:, TOP_CLASSES:] / (TAIL_SAMPLES * q.gather(1, drawn).clamp_min(1e-300))
        w = torch.cat([pc[:, :TOP_CLASSES], tail_w], 1)
        w[:, TOP_CLASSES:] *= (tail.sum(1, keepdim=True) > 0)  # no tail mass: nothing to sample
        u = (p.unsqueeze(1) - F.one_hot(cls, C).to(p.dtype)) * w.sqrt().unsqueeze(-1)  # (B, K, C)
        u = u.transpose(0, 1)
    elif mode == "mc_fisher":
        c = torch.multinomial(p, 1, generator=generator).squeeze(1)  # (B,)
        u = (p - F.one_hot(c, C).to(p.dtype)).unsqueeze(0)  # (1, B, C)
    elif mode == "mc_fisher_is":
        # importance sampling: q_c ~ p_c ||p - e_c||^2, weight p_c / q_c (unbiased; if ||J^T u|| ~ ||u||,
        # every label gives nearly the same value and the label noise vanishes)
        q = _is_weights(p)
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
    group: int | None = None,
    counted: Tensor | None = None,
) -> Iterator[tuple[list[list[tuple[Tensor, Tensor]]], list[Tensor], int]]:
    """Forward x, then backward the K vectors of `output_grad_vectors` to each layer's output (or its
    own input, wrt_input=True), `group` vectors at a time (all at once by default). Yields (records,
    grads (k, B, ...) in record order, k) per group of k vectors; the K gradients add up over groups.
    Sequence logits (B, T, C): `counted` (B, T) marks the tokens the loss counts (default all)."""
    logits, records = recorded(lambda: model(x), modules, grad_input=wrt_input)
    if not isinstance(logits, Tensor) or logits.dim() not in (2, 3):
        raise ValueError("per-sample traces need a model returning logits (B, C) or (B, T, C): "
                         "use method='hutchinson'")
    missing = [i for i, r in enumerate(records) if not r]
    if missing:
        raise ValueError(f"layers {missing} were not called in the forward pass: check `layers`")
    u = output_grad_vectors(logits, mode, generator, counted)  # (K, B, C) or (K, B, T, C)
    targets = [t for r in records for _, t in r]
    K = u.shape[0]
    group = K if group is None else max(1, group)
    for s in range(0, K, group):
        part = u[s : s + group]
        last = s + group >= K
        if part.shape[0] == 1:
            grads = [g.unsqueeze(0) for g in torch.autograd.grad(logits, targets, part[0], retain_graph=not last)]
        else:
            grads = list(torch.autograd.grad(logits, targets, part, is_grads_batched=True, retain_graph=not last))
        yield records, grads, part.shape[0]


# hybrid: images with 1 - ||p||^2 >= this get the exact sum over classes, the others one importance-sampled
# class. Uncertain images carry the heavy tail of per-image traces (up to ~1000x the mean), where label
# noise would dominate; ~10% of images on ResNet-20/Fashion-MNIST (measured, bench/trace.py).
HYBRID_UNCERTAINTY = 0.5


def hybrid_split(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, str]:
    """Indices of (uncertain, confident) images of a chunk, from one forward pass without gradients, and the
    per-sample mode the uncertain ones get (`exact_mode` of the number of classes)."""
    with torch.no_grad():
        p = torch.softmax(model(x).double(), dim=-1)
    hard = ((1 - (p * p).sum(1)) >= HYBRID_UNCERTAINTY).cpu()  # CPU indices: they index CPU results too
    return hard.nonzero().squeeze(1), (~hard).nonzero().squeeze(1), exact_mode(p.shape[-1])


@dataclass(frozen=True)
class ChunkPlan:
    """How one chunk is cut to fit memory: images per backward and backward vectors per group."""

    images: int | None = None  # None: the whole chunk
    vectors: int | None = None  # None: all vectors of a pass at once
    batch_dims: tuple[int, ...] = ()  # per layer: the input dim that indexes the images


def counted_tokens(y: Tensor) -> Tensor | None:
    """The tokens a sequence loss counts, (B, T) bool, for sequence targets (B, T); None for targets (B,)."""
    from hawq.hessian.hutchinson import IGNORE_INDEX

    return (y != IGNORE_INDEX).cpu() if y.dim() == 2 else None


def exact_mode(num_classes: int) -> str:
    """What `exact` within `hybrid` means for this many classes (see TOP_CLASSES)."""
    return "exact" if num_classes <= EXACT_CLASSES else "top_is"


def persample_traces(
    model: nn.Module,
    modules: Sequence[nn.Module],
    x: Tensor,
    mode: str,
    generator: torch.Generator | None = None,
    diagonal: bool = False,
    plan: ChunkPlan | None = None,
    counted: Tensor | None = None,
) -> tuple[Tensor, list[Tensor] | None, int]:
    """Per-image Gauss-Newton average traces for one chunk of images.

    Returns (values (B, L) float64 with values[i, l] = sum_c p_ic ||grad_{W_l} CE_ic||^2 / n_l (or an
    unbiased estimate of it), per-layer diagonal sums (or None), image-backward passes spent: the sum over
    images of the backward vectors each one took). Sequences (logits (B, T, C)): one value per sequence,
    `counted` (B, T) the tokens its loss counts (see `output_grad_vectors`); `hybrid` then gives every
    sequence the per-token mode of uncertain images.
    """
    plan = plan or ChunkPlan()
    if mode == "hybrid" and counted is not None:  # sequences: tokens are summed, no per-sequence split
        with torch.no_grad():
            width = model(x[:1]).shape[-1]
        mode = exact_mode(width)
    if mode == "hybrid":
        values = torch.empty(x.shape[0], len(modules), dtype=torch.float64)
        diags: list[Tensor] | None = None
        spent = 0
        hard, easy, uncertain_mode = hybrid_split(model, x)
        for idx, sub in ((hard, uncertain_mode), (easy, "mc_fisher_is")):
            if len(idx):
                v, d, k = persample_traces(model, modules, x[idx], sub, generator, diagonal, plan)
                values[idx] = v
                diags = d if diags is None or d is None else [a + b for a, b in zip(diags, d)]
                spent += k
        return values, diags, spent
    step = plan.images or x.shape[0]
    if step < x.shape[0]:  # images are independent: cut the chunk, same values
        parts = [persample_traces(model, modules, x[i : i + step], mode, generator, diagonal, plan,
                                  None if counted is None else counted[i : i + step])
                 for i in range(0, x.shape[0], step)]
        diags = None if not diagonal else [sum(d[li] for _, d, _ in parts) for li in range(len(modules))]
        return torch.cat([v for v, _, _ in parts]), diags, sum(k for _, _, k in parts)
    B = x.shape[0]
    values = torch.zeros(B, len(modules), dtype=torch.float64)
    diags = [torch.zeros(m.weight.shape, dtype=torch.float64) for m in modules] if diagonal else None
    spent = 0
    for records, grads, k in gn_backward(model, modules, x, mode, generator, group=plan.vectors, counted=counted):
        spent += k * B  # one image through one backward vector = 1
        j = 0
        for li, (m, r) in enumerate(zip(modules, records)):
            calls = [(inp, grads[j + c]) for c, (inp, _) in enumerate(r)]
            j += len(r)
            bdim = plan.batch_dims[li] if plan.batch_dims else 0
            norms, diag = sq_norms(m, calls, force_materialize=diagonal, batch=B, bdim=bdim)
            values[:, li] += norms.double().cpu() / m.weight.numel()
            if diags is not None:
                diags[li] += diag.reshape(m.weight.shape).double().cpu()
        del grads
    return values, diags, spent


def layer_output_numel(model: nn.Module, modules: Sequence[nn.Module], x: Tensor) -> int:
    """Elements of every layer output (all calls) for one image."""
    with capture_io(modules) as records, torch.no_grad():
        model(x[:1])
    return sum(out.numel() for r in records for _, out in r)


def chunk_memory_bytes(model: nn.Module, modules: Sequence[nn.Module], x: Tensor, n_vectors: int) -> int:
    """Rough peak bytes of one chunk: the layer-output gradients for all backward vectors."""
    per_image = layer_output_numel(model, modules, x)
    return int(per_image * x.shape[0] * n_vectors * x.element_size() * 3)


def plan_chunk(
    model: nn.Module, modules: Sequence[nn.Module], x: Tensor, chunk_size: int, n_vectors: int,
    limit_bytes: int | None, batch_dims: Sequence[int] = (),
) -> ChunkPlan:
    """Images per backward and vectors per group so that one backward's gradients fit in `limit_bytes`
    (the sums are the same however the chunk is cut; only the time changes)."""
    per_vector_image = chunk_memory_bytes(model, modules, x[:1], 1)
    if limit_bytes is None:
        return ChunkPlan(batch_dims=tuple(batch_dims))
    budget = int(0.6 * limit_bytes)
    need = per_vector_image * (n_vectors + 1)  # +1: the forward's own activations, roughly
    if need * chunk_size <= budget:
        return ChunkPlan(batch_dims=tuple(batch_dims))
    images = budget // need
    if images >= 1:
        return ChunkPlan(images=int(images), batch_dims=tuple(batch_dims))
    vectors = budget // per_vector_image - 1
    if vectors < 1:
        raise ValueError(
            f"one image needs about {2 * per_vector_image / 2**30:.1f} GiB for its per-class gradients, more "
            f"than the {limit_bytes / 2**30:.1f} GiB available: use a smaller input or method='hutchinson'"
        )
    return ChunkPlan(images=1, vectors=int(vectors), batch_dims=tuple(batch_dims))


def available_memory_bytes(device: torch.device | str | None = None) -> int | None:
    """Free memory of `device` (CUDA: the device's free memory; CPU: MemAvailable)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
