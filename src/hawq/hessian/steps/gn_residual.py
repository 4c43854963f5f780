"""gn_residual: hybrid's exact Gauss-Newton values per image plus residual probes of the chunk (residual.py)."""

from __future__ import annotations

import torch

from hawq.hessian.output_hessian import loss_gn_traces
from hawq.hessian.persample import counted_tokens, persample_traces
from hawq.hessian.residual import residual_probes


def step(run, model, modules, method, x, y, loss_fn, n_probes) -> None:
    if run.loss_gn:  # a loss other than cross-entropy: its own output Hessian (output_hessian.py)
        values, _, k = loss_gn_traces(model, modules, x, y, loss_fn, run.gen, run.plan)
    else:
        values, _, k = persample_traces(model, modules, x, "hybrid", run.gen, False, run.plan, counted_tokens(y))
    run.stats.add(values)
    r = torch.zeros(len(run.names), dtype=torch.float64)
    if run.curved:  # proved layers have R_ll = 0: no probes there
        params = [modules[i].weight for i in run.curved]
        est = residual_probes(model, params, x, y, loss_fn, n_probes, run.gen)
        per_probe = torch.zeros(est.shape[0], len(run.names), dtype=torch.float64)
        per_probe[:, list(run.curved)] = est
        r = per_probe.mean(0)
        run.residual_spread.add(per_probe)  # a floor under the residual's standard error
        run.n_probes += n_probes
        # the chunk's first backward, then one second backward per probe and curved layer (each partial: it
        # stops at its layer's weight), counted as one backward per image each
        k += (1 + n_probes * len(run.curved)) * x.shape[0]
    run.residual.add(r, values.mean(0))
    run.n_backward += k
