"""exact, hybrid, mc_fisher, mc_fisher_is: per-image Gauss-Newton traces from per-sample gradients."""

from __future__ import annotations

from hawq.hessian.persample import counted_tokens, persample_traces


def step(run, model, modules, method, x, y, loss_fn, n_probes) -> None:
    values, diags, k = persample_traces(model, modules, x, method, run.gen, run.diag_sums is not None, run.plan,
                                        counted_tokens(y))
    run.stats.add(values)  # one independent sample per image
    run.n_backward += k
    if diags is not None:
        for acc, d in zip(run.diag_sums, diags):
            acc += d.cpu()
