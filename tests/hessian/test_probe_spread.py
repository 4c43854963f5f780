"""Hutchinson's standard error with few chunks of data: not below the probes' own noise."""

from __future__ import annotations

import warnings

from hawq.hessian import estimate_traces


def test_hutchinson_stderr_from_two_chunks_is_not_below_probe_noise(tiny_mlp_case, dense_traces):
    """Two chunks give the spread of chunk means one degree of freedom: alone it puts the dense trace beyond
    3 standard errors in about a fifth of the runs (a Student t with 1 degree of freedom); with the floor from
    the probes inside each chunk, in few of them."""
    model, x, y = tiny_mlp_case
    runs, far = 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in range(60):
            r = estimate_traces(model, [(x[:12], y[:12]), (x[12:], y[12:])], method="hutchinson",
                                max_images=None, rel_tol=1e-9, probes_per_batch=4, seed=seed, progress=False)
            if seed == 0:
                dense = {k: float(v.mean()) for k, v in dense_traces(model, x, y, [lt.fqn for lt in r.layers]).items()}
            for lt in r.layers:
                runs += 1
                far += abs(lt.trace - dense[lt.fqn]) > 3 * lt.stderr
    assert far <= 0.06 * runs, (far, runs)
