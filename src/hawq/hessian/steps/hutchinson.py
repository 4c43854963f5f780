"""hutchinson: Rademacher probes of true Hessian-vector products on the chunk's mean loss."""

from __future__ import annotations

from hawq.hessian.hutchinson import hvp_probes


def step(run, model, modules, method, x, y, loss_fn, n_probes) -> None:
    est = hvp_probes(model, [m.weight for m in modules], x, y, loss_fn, n_probes, run.gen)
    run.stats.add(est.mean(0, keepdim=True))  # probes of one chunk share its data: one sample
    run.spread.add(est)  # their spread: a floor under the standard error when chunks are few
    run.n_backward += 1 + n_probes
    run.n_probes += n_probes
