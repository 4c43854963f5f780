"""Activation traces: per-image values at each layer's input, by Gauss-Newton or Hutchinson probes."""

from __future__ import annotations

from hawq.hessian.activation_traces import act_hutchinson, act_persample


def step(run, model, modules, method, x, y, loss_fn, n_probes) -> None:
    if method == "hutchinson":
        values, k = act_hutchinson(model, modules, x, y, loss_fn, n_probes, run.gen)
        run.n_probes += n_probes
    else:
        values, k = act_persample(model, modules, x, method, run.gen)
    run.stats.add(values)  # one sample per image either way (block-diagonal Hessian)
    run.n_backward += k
