"""One file per trace method: what it computes on one chunk of images and adds to the running sums.

Each step has the signature `step(run, model, modules, method, x, y, loss_fn, n_probes)` and updates
`run` (an `EstimationRun`): its per-image or per-chunk statistics and its counters. `hawq.hessian.methods`
maps the method names to these steps; adding a method is one file here and one row there.
"""
