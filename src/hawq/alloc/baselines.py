"""Baseline bit allocators that spend the same size budget as HAWQ-V2, for fair comparisons.

Every allocator is `(table, budget_bytes, ...) -> Plan`; the returned plan's size is within the budget
and its `omega` is the total HAWQ-V2 Omega under `table` (so plans of different allocators compare on one
scale). Most baselines only change the per-layer score that multiplies ||Q_b(W_i) - W_i||^2 and then
run the same exact knapsack as `best_plan`:

    hawq       Tr(H_i)/n_i                         (HAWQ-V2, Dong et al. arXiv 1911.03852)
    diag       1/2 sum_j H_jj (Q_b(W)_j - W_j)^2   (pass a table built with `diagonals=`)
    v1         lambda_max(H_i)/n_i, power iteration (HAWQ-V1's sensitivity, Dong et al. arXiv 1905.03696)
    eigbound   lambda_max(H_i): sum_i lambda_i ||dW_i||^2 bounds the quadratic term from above
    fisher     mean_x ||grad_{W_i} CE(x, y)||^2 / n_i with true labels (empirical Fisher, first order)
    reversed   1 / (Tr(H_i)/n_i): the least sensitive layers get the most bits
    random     log-uniform random scores (seeded)

Two do not use the knapsack: `uniform_plan` (the largest single bit width whose size fits; for a
fractional budget such as 2.5 bits that is 2 bits, which spends less than the budget) and
`monotone_plan` (bit widths non-increasing in descending trace order, the heuristic of earlier
toolkits; the least-Omega such plan within the budget, found by trying every monotone plan:
C(L+k-1, k-1) of them for L free layers and k widths, 1,540 for ResNet-20).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from hawq.alloc.options import other_bits
from hawq.alloc.plan import Plan, best_plan, check_budget, make_plan, plan_for_bits
from hawq.alloc.sensitivity import SensitivityTable
from hawq.alloc.size import MB, model_size_bits
from hawq.hessian.curvature import inspect_model
from hawq.hessian.estimate import estimation_mode, resolve_layers
from hawq.hessian.persample import gn_backward, recorded, sq_norms

ALLOCATORS = ("uniform", "random", "reversed", "v1", "eigbound", "fisher", "monotone", "hawq", "diag")


# --------------------------------------------------------------------------------------------- scores
def rescored_table(table: SensitivityTable, scores: Mapping[str, float]) -> SensitivityTable:
    """The table with Omega_i(b) = scores[i] * ||Q_b(W_i) - W_i||^2 for every free layer.

    Fixed layers keep their rows (one option: their Omega is a constant of every plan).
    """
    rows = []
    for r in table.layers:
        if r.fixed:
            rows.append(r)
            continue
        if r.fqn not in scores:
            raise ValueError(f"scores lack the free layer {r.fqn!r}: give a score for every free layer")
        s = float(scores[r.fqn])
        if not math.isfinite(s) or s < 0:
            raise ValueError(f"score of {r.fqn!r} is {s}: scores must be finite and >= 0")
        rows.append(replace(r, trace=s, omega={b: s * r.perturbation[b] for b in r.bits}))
    return SensitivityTable(tuple(rows), table.other_params, table.bits, "trace")


def _free(table: SensitivityTable) -> list[str]:
    return [r.fqn for r in table.layers if not r.fixed]


def score_plan(table: SensitivityTable, budget_bytes: float, scores: Mapping[str, float]) -> Plan:
    """Least sum_i scores_i * ||Q(W_i) - W_i||^2 within the budget; `omega` is re-read from `table`."""
    chosen = best_plan(rescored_table(table, scores), budget_bytes)
    return make_plan(table, chosen.w_bits)


# ----------------------------------------------------------------------------------------- allocators
def hawq_plan(table: SensitivityTable, budget_bytes: float) -> Plan:
    """HAWQ-V2 itself (the table's own Omega, trace or diagonal): `best_plan`."""
    return best_plan(table, budget_bytes)


def uniform_plan(table: SensitivityTable, budget_bytes: float) -> Plan:
    """Every free layer at the largest candidate width whose size fits the budget."""
    check_budget(budget_bytes, "the size budget", "--budget-mb")
    cap = math.floor(budget_bytes * 8) if math.isfinite(budget_bytes) else math.inf
    for b in sorted(table.bits, reverse=True):
        if model_size_bits(table, b) <= cap:
            return plan_for_bits(table, b)
    raise ValueError(
        f"budget {budget_bytes / MB:.6g} MB is below the size of uniform {min(table.bits)}-bit weights: "
        "raise the budget or add a lower bit width"
    )


def random_plan(table: SensitivityTable, budget_bytes: float, seed: int = 0, decades: float = 6.0) -> Plan:
    """Scores drawn log-uniformly over `decades` decades (seeded), through the same exact knapsack.

    So a random plan spends the budget as fully as HAWQ's does; only which layers get bits is random.
    """
    g = torch.Generator().manual_seed(int(seed))
    free = _free(table)
    u = torch.rand(len(free), generator=g, dtype=torch.float64)
    return score_plan(table, budget_bytes, {f: 10.0 ** (decades * (float(x) - 0.5)) for f, x in zip(free, u)})


def reversed_plan(table: SensitivityTable, budget_bytes: float) -> Plan:
    """Scores 1/trace: the ranking of sensitivities turned upside down (a zero trace scores 1e30)."""
    return score_plan(
        table, budget_bytes, {f: 1.0 / table[f].trace if table[f].trace > 0 else 1e30 for f in _free(table)}
    )


def v1_plan(table: SensitivityTable, budget_bytes: float, eigenvalues: Mapping[str, float]) -> Plan:
    """HAWQ-V1's sensitivity S_i = lambda_i / n_i: the top Hessian eigenvalue of each layer's block
    (`top_eigenvalues`) per parameter, in place of HAWQ-V2's Tr(H_i) / n_i, through the same knapsack."""
    return score_plan(table, budget_bytes,
                      {f: max(float(eigenvalues[f]), 0.0) / table[f].n_params for f in _free(table)})


def eig_bound_plan(table: SensitivityTable, budget_bytes: float, eigenvalues: Mapping[str, float]) -> Plan:
    """The top eigenvalue itself as the score: sum_i lambda_i ||Q(W_i) - W_i||^2 bounds the second-order
    loss change from above (dW' H dW <= lambda ||dW||^2), the worst case HAWQ-V2's average replaces."""
    return score_plan(table, budget_bytes, {f: max(float(eigenvalues[f]), 0.0) for f in _free(table)})


def fisher_plan(table: SensitivityTable, budget_bytes: float, fisher: Mapping[str, float]) -> Plan:
    """First-order sensitivity: the empirical Fisher trace per parameter (`empirical_fisher`) as score."""
    return score_plan(table, budget_bytes, {f: float(fisher[f]) for f in _free(table)})


def monotone_plan(table: SensitivityTable, budget_bytes: float) -> Plan:
    """Least-Omega plan within the budget whose widths do not increase in descending-trace order.

    Free layers sorted by trace (ties: table order); the plan is fixed by the breakpoints between the
    widths, so every monotone plan is tried (vectorised with prefix sums).
    """
    check_budget(budget_bytes, "the size budget", "--budget-mb")
    free = sorted(_free(table), key=lambda f: -table[f].trace)  # stable: ties keep table order
    bits = sorted(table.bits, reverse=True)  # widest first
    fixed_bits = {r.fqn: r.bits[0] for r in table.layers if r.fixed}
    if not free:
        return make_plan(table, fixed_bits)
    cap = math.floor(budget_bytes * 8) if math.isfinite(budget_bytes) else 2**62
    base = other_bits(table) + sum(table[f].n_params * b for f, b in fixed_bits.items())
    L = len(free)
    # prefix[k][i] = sum over the first i sorted layers at width bits[k]
    size_pre = np.zeros((len(bits), L + 1), np.int64)
    omega_pre = np.zeros((len(bits), L + 1), np.float64)
    for k, b in enumerate(bits):
        size_pre[k, 1:] = np.cumsum([table[f].n_params * b for f in free])
        omega_pre[k, 1:] = np.cumsum([table[f].omega[b] for f in free])
    cuts = np.array(list(itertools.combinations_with_replacement(range(L + 1), len(bits) - 1)), np.int64)
    cuts = cuts.reshape(-1, len(bits) - 1)
    edges = np.concatenate([np.zeros((len(cuts), 1), np.int64), cuts, np.full((len(cuts), 1), L)], axis=1)
    size = np.full(len(cuts), base, np.int64)
    omega = np.zeros(len(cuts))
    for k in range(len(bits)):  # layers edges[k]..edges[k+1] take bits[k]
        size += size_pre[k, edges[:, k + 1]] - size_pre[k, edges[:, k]]
        omega += omega_pre[k, edges[:, k + 1]] - omega_pre[k, edges[:, k]]
    ok = np.flatnonzero(size <= cap)
    if not len(ok):
        raise ValueError(
            f"budget {budget_bytes / MB:.6g} MB is below the smallest feasible size: raise --budget-mb"
        )
    best = ok[np.lexsort((-size[ok], omega[ok]))[0]]  # least Omega, then the largest size
    w = dict(fixed_bits)
    for k, b in enumerate(bits):
        for i in range(edges[best, k], edges[best, k + 1]):
            w[free[i]] = b
    return make_plan(table, w)


# ------------------------------------------------------------------------------- per-layer measures
def _take(batches: Iterable[tuple[Tensor, Tensor]], max_images: int | None) -> list[tuple[Tensor, Tensor]]:
    out, seen = [], 0
    for batch in batches:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError("`batches` must yield (inputs, labels) pairs")
        x, y = batch[0], batch[1]
        if max_images is not None:
            x, y = x[: max_images - seen], y[: max_images - seen]
        if len(y):
            out.append((x, y))
            seen += len(y)
        if max_images is not None and seen >= max_images:
            break
    if not out:
        raise ValueError("`batches` is empty: pass at least one (inputs, labels) batch")
    return out


def top_eigenvalues(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    layers: Sequence[str] | None = None,
    *,
    method: str = "auto",
    iters: int = 20,
    tol: float = 1e-3,
    max_images: int | None = 256,
    chunk_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Largest-magnitude eigenvalue of each layer's Hessian block of the mean cross-entropy (HAWQ-V1).

    Power iteration v <- H_ll v / ||H_ll v|| on each layer's own block, H averaged over the images of
    `batches` (up to `max_images`); a layer stops once its Rayleigh quotient changes by less than `tol`
    (relative) or after `iters` products. Products H_ll v:
      hvp           double backward through the gradient w.r.t. that layer's weight (any network; one
                    pass per layer and iteration);
      gauss_newton  J_l^T (diag(p) - p p^T) J_l v from one class-batched backward per chunk shared by all
                    layers (docs/design.md: equal to the Hessian block for nets piecewise linear in each
                    layer's weights, with cross-entropy);
      auto          gauss_newton when the model has no curved op (hawq.hessian's check), else hvp.
    The model runs in eval mode; its flags and requires_grad come back.
    """
    if iters < 1 or not tol >= 0:
        raise ValueError(f"iters must be >= 1 and tol >= 0, got iters={iters}, tol={tol}")
    if method not in ("auto", "hvp", "gauss_newton"):
        raise ValueError(f"unknown method {method!r}: use 'auto', 'hvp' or 'gauss_newton'")
    names = resolve_layers(model, layers)
    modules = [model.get_submodule(n) for n in names]
    params = [m.weight for m in modules]
    data = _take(batches, max_images)
    data = [(x[i : i + chunk_size], y[i : i + chunk_size]) for x, y in data for i in range(0, len(y), chunk_size)]
    n_total = sum(len(y) for _, y in data)
    g = torch.Generator().manual_seed(int(seed))
    vs = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p) for p in params]
    vs = [v / v.norm() for v in vs]
    eig = [math.nan] * len(names)
    active = list(range(len(names)))
    with estimation_mode(model, params):
        if method == "auto":
            method = "hvp" if inspect_model(model, modules, data[0][0][:2], names).curved else "gauss_newton"
        for _ in tqdm(range(iters), desc="eigenvalues", disable=not progress, delay=2.0, leave=False):
            hv = [torch.zeros_like(p) for p in params]
            for x, y in data:
                if method == "hvp":
                    _hvp_blocks(model, params, x, y, n_total, active, vs, hv)
                else:
                    _gn_blocks(model, modules, x, n_total, active, vs, hv)
            still = []
            for i in active:
                new = float((hv[i] * vs[i]).sum())  # Rayleigh quotient, ||v|| = 1
                norm = hv[i].norm()
                done = math.isfinite(eig[i]) and abs(new - eig[i]) <= tol * max(abs(new), 1e-30)
                eig[i] = new
                if norm > 0:
                    vs[i] = hv[i] / norm
                if not done and norm > 0:
                    still.append(i)
            active = still
            if not active:
                break
    return dict(zip(names, eig))


def _hvp_blocks(model, params, x, y, n_total, active, vs, hv) -> None:
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y, reduction="sum") / n_total
        grads = torch.autograd.grad(loss, [params[i] for i in active], create_graph=True)
    for j, i in enumerate(active):
        (h,) = torch.autograd.grad(grads[j], params[i], grad_outputs=vs[i], retain_graph=True)
        hv[i] += h.detach()


def _layer_fn(m: nn.Module, x: Tensor, w: Tensor) -> Tensor:
    return m._conv_forward(x, w, None) if isinstance(m, nn.Conv2d) else F.linear(x, w)


def _gn_blocks(model, modules, x, n_total, active, vs, hv) -> None:
    # u_c = sqrt(p_c)(p - e_c): sum_c u_c u_c^T = diag(p) - p p^T, the Hessian of CE w.r.t. the logits
    ((records, grads, _),) = gn_backward(model, [modules[i] for i in active], x, "exact", None)
    j = 0
    for i, calls in zip(active, records):
        m, gs = modules[i], grads[j : j + len(calls)]
        j += len(calls)
        with torch.no_grad():  # s[k, b] = u_kb^T J_b v: linear in the weight, so the layer applied to v
            s = sum((gk * _layer_fn(m, inp, vs[i]).unsqueeze(0)).flatten(2).sum(-1) for (inp, _), gk in zip(calls, gs))
        w = vs[i].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = sum((_layer_fn(m, inp, w) * torch.einsum("kb,kb...->b...", s, gk)).sum()
                      for (inp, _), gk in zip(calls, gs))
            (h,) = torch.autograd.grad(out, w)
        hv[i] += h.detach() / n_total


def empirical_fisher(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    layers: Sequence[str] | None = None,
    *,
    max_images: int | None = 4096,
    chunk_size: int = 64,
    progress: bool = True,
) -> dict[str, float]:
    """mean_x ||grad_{W_l} CE(f(x), y)||^2 / n_l with the true labels y: the empirical Fisher trace.

    One backward pass per chunk gives every image's own gradient (eval mode: images are independent).
    """
    names = resolve_layers(model, layers)
    modules = [model.get_submodule(n) for n in names]
    params = [m.weight for m in modules]
    data = _take(batches, max_images)
    total = torch.zeros(len(names), dtype=torch.float64)
    count = 0
    chunks = [(x[i : i + chunk_size], y[i : i + chunk_size]) for x, y in data for i in range(0, len(y), chunk_size)]
    with estimation_mode(model, params):
        for x, y in tqdm(chunks, desc="fisher", disable=not progress, delay=2.0, leave=False):
            logits, records = recorded(lambda x=x: model(x), modules)
            u = (torch.softmax(logits.detach(), -1) - F.one_hot(y, logits.shape[-1]).to(logits.dtype))
            outs = [out for r in records for _, out in r]
            grads = torch.autograd.grad(logits, outs, grad_outputs=u)
            j = 0
            for li, (m, r) in enumerate(zip(modules, records)):
                calls = [(inp, grads[j + k].unsqueeze(0)) for k, (inp, _) in enumerate(r)]
                j += len(r)
                norms, _ = sq_norms(m, calls)
                total[li] += norms.double().sum() / m.weight.numel()
            count += len(y)
    return {n: float(total[i] / count) for i, n in enumerate(names)}


__all__ = [
    "ALLOCATORS",
    "empirical_fisher",
    "fisher_plan",
    "hawq_plan",
    "monotone_plan",
    "random_plan",
    "rescored_table",
    "reversed_plan",
    "score_plan",
    "top_eigenvalues",
    "uniform_plan",
    "v1_plan",
    "eig_bound_plan",
]
