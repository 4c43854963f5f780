"""`estimate_traces`: per-layer average Hessian traces Tr(H_l)/n_l with standard errors (HAWQ-V2 step 1).

Images are consumed chunk by chunk until every layer holding at least `min_share` of the total trace has a
relative standard error <= `rel_tol` (data sampling included), or `max_images` is reached.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hawq.hessian import persample
from hawq.hessian.accumulator import EstimationRun
from hawq.hessian.activation_traces import input_numels
from hawq.hessian.hutchinson import LossFn
from hawq.hessian.methods import TraceOptions, choose
from hawq.hessian.persample import ChunkPlan, available_memory_bytes
from hawq.hessian.result import TraceResult
from hawq.quant import quantizable_layers

_SAVE_EVERY_S = 2.0
plan_chunk = persample.plan_chunk  # module attribute: tests cut chunks by patching memory


def weights_hash(model: nn.Module, layers: Sequence[str] | None = None) -> str:
    """sha256 of every parameter and buffer (names, dtypes, shapes, values) and the layer list."""
    h = hashlib.sha256()
    h.update(json.dumps(list(layers) if layers is not None else None).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def resolve_layers(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    names = quantizable_layers(model) if layers is None else list(layers)
    modules = dict(model.named_modules())
    for n in names:
        if n not in modules or not isinstance(getattr(modules[n], "weight", None), Tensor):
            raise ValueError(f"{n!r} is not a layer with a weight in this model: see hawq.quantizable_layers(model)")
    if not names:
        raise ValueError("no layers to estimate: the model has no Conv2d/Linear layer, pass `layers`")
    if len(set(names)) != len(names):
        raise ValueError("`layers` lists a layer twice")
    return names


@contextmanager
def estimation_mode(model: nn.Module, params: Sequence[Tensor]):
    """Eval mode, gradients only for `params`; the caller's train flags and requires_grad come back."""
    training = {m: m.training for m in model.modules()}
    req = {p: p.requires_grad for p in model.parameters()}
    wanted = {id(p) for p in params}
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
        yield
    finally:
        for m, t in training.items():
            m.train(t)
        for p, r in req.items():
            p.requires_grad_(r)


def _chunks(batches: Iterable[Any], chunk_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    for batch in batches:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError("`batches` must yield (inputs, labels) pairs")
        x, y = batch[0], batch[1]
        for i in range(0, x.shape[0], chunk_size):
            yield x[i : i + chunk_size], y[i : i + chunk_size]


def _to_model(x: Tensor, ref: Tensor) -> Tensor:
    x = x.to(ref.device)
    return x.to(ref.dtype) if x.is_floating_point() else x


def estimate_traces(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    layers: Sequence[str] | None = None,
    *,
    method: str = "auto",
    loss: str | LossFn = "cross_entropy",
    rel_tol: float = 0.05,
    min_share: float = 0.01,
    max_images: int | None = 4096,
    max_probes: int = 200,
    chunk_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    diagonal: bool = False,
    state_path: str | Path | None = None,
    probes_per_batch: int | None = None,
) -> TraceResult:
    """Average Hessian trace Tr(H_l)/n_l of the loss w.r.t. each layer's weight, with standard errors.

    Methods (see hawq.hessian.methods): exact, hybrid, gn_residual, mc_fisher, mc_fisher_is, hutchinson,
    and auto: for cross-entropy on logits (B, C), `hybrid` where every layer is proved piecewise linear in
    its weights (curvature.py: recorded ATen ops, an allowlist, one use per layer; the Gauss-Newton trace
    is then the Hessian trace), else `gn_residual` (exact GN part plus probed residual on the curved layers,
    unbiased for the Hessian trace; GN only, with a note, where double backward is missing); any other
    loss: hutchinson. `result.reason` says why; `result.notes` say what the numbers mean where they are
    not the Hessian trace.
    Layers: by default every Conv2d/Linear layer the forward calls (layers it never calls, e.g. auxiliary
    heads in eval mode, are left out with a note); a layer named in `layers` must be called.
    Many classes: above 16 classes an uncertain image costs 12 backward vectors (top classes exact, the
    rest importance-sampled), not C; a chunk is cut to fit the memory of the model's device.
    Sequences: loss 'cross_entropy' also takes logits (B, T, C) with targets (B, T) (-100: not counted),
    one sequence one sample (hawq.hessian.methods: its tokens summed with random signs, unbiased).
    Per-image contributions are heavy-tailed (on ResNet-20/Fashion-MNIST one image in ~5,000 carries
    ~100-1,000x the mean of the first layers), so a run that meets such an image needs many more images.
    Standard errors: per-image values (GN methods), per-chunk residual and probe means (gn_residual,
    hutchinson) are iid, so every stderr includes data sampling. Stopping: after each chunk, once every layer
    whose full trace n_l*trace_l is >= min_share of the sum has stderr <= rel_tol*trace, or at max_images
    images (hutchinson: also at max_probes probes); a result that stops above rel_tol says so with a warning
    and `converged=False`. The model runs in eval mode; its train flags, requires_grad and parameters are
    left as they were. Same seed and batches -> identical `to_dict()` apart from wall_s.
    `state_path`: running sums are saved there (atomically) and a rerun with the same weights, data order
    and settings resumes from them, skipping the images already counted.
    `diagonal=True` (GN methods): `result.diagonals[fqn]` is the Gauss-Newton diagonal (shape of the
    weight), e.g. for Omega = 1/2 sum_j H_jj (Q(W)_j - W_j)^2.
    `probes_per_batch`: random probes per chunk; default by method (methods.PROBES_PER_CHUNK): gn_residual 1
    per curved layer (each layer its own probe, residual.py), hutchinson 4.
    """
    opts = TraceOptions(method, loss, rel_tol, min_share, max_images, max_probes, chunk_size, seed, progress,
                        diagonal, state_path, probes_per_batch)
    return _estimate(model, batches, layers, opts)


def estimate_activation_traces(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    layers: Sequence[str] | None = None,
    *,
    method: str = "auto",
    loss: str | LossFn = "cross_entropy",
    rel_tol: float = 0.05,
    min_share: float = 0.01,
    max_images: int | None = 4096,
    max_probes: int = 200,
    chunk_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    state_path: str | Path | None = None,
    probes_per_batch: int = 1,
) -> TraceResult:
    """Average trace of each image's loss Hessian w.r.t. the INPUT activation of each layer.

    `LayerTrace.n_params` is the numel of one image's input to the layer, `trace` is
    E_i[Tr(d^2 loss_i / d a_i^2)] / n. The Hessian is block-diagonal over images, so one backward per class
    (exact) or per probe (hutchinson, here `probes_per_batch` probes per chunk, each image its own probe)
    gives every image's contribution; `n_samples` counts images. `auto`: hybrid where every layer is proved
    piecewise linear (the Gauss-Newton identity holds for their input activations too), else hutchinson.
    Stopping rule, standard errors, determinism and `state_path` are as in `estimate_traces`.
    """
    if method == "gn_residual":  # the residual is probed for weights; activations of curved nets: auto's rule
        method = "auto"
    opts = TraceOptions(method, loss, rel_tol, min_share, max_images, max_probes, chunk_size, seed, progress,
                        False, state_path, probes_per_batch, activations=True)
    return _estimate(model, batches, layers, opts)


def _called_layers(model, names, explicit: bool, info) -> tuple[list[int], str | None]:
    """Indices of the layers the forward calls; a note naming the others (an error if the user named them)."""
    idle = [names[i] for i, u in enumerate(info.used) if not u]
    if idle and explicit:
        raise ValueError(f"layers {', '.join(idle[:5])} are not called in the forward pass: check `layers`")
    keep = [i for i, u in enumerate(info.used) if u]
    if not keep:
        raise ValueError("the forward pass calls none of the layers: check the model and `layers`")
    note = None
    if idle:
        note = (f"{len(idle)} layers never called in the forward (left out): {', '.join(idle[:4])}"
                + (", ..." if len(idle) > 4 else ""))
    return keep, note


def _attention_note(model: nn.Module) -> str | None:
    mha = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if not mha:
        return None
    return (f"{len(mha)} nn.MultiheadAttention modules keep their projections in float: "
            "hawq.decompose_attention_(model) makes them quantizable layers")


def _estimate(
    model: nn.Module, batches: Iterable[Any], layers: Sequence[str] | None, opts: TraceOptions
) -> TraceResult:
    t0 = time.perf_counter()
    activations = opts.activations
    names = resolve_layers(model, layers)
    mods = dict(model.named_modules())
    modules = [mods[n] for n in names]
    params = [m.weight for m in modules]
    ref = params[0]

    stream = _chunks(batches, opts.chunk_size)
    try:
        first = next(stream)
    except StopIteration:
        raise ValueError("`batches` is empty: pass at least one (inputs, labels) batch") from None
    stream = itertools.chain([first], stream)
    from hawq.hessian.curvature import inspect_model
    from hawq.hessian.hutchinson import resolve_loss
    from hawq.hessian.methods import BY_NAME

    notes: list[str] = []
    with estimation_mode(model, [] if activations else params):
        x0 = _to_model(first[0][:2], ref)
        info = inspect_model(model, modules, x0, names)
        if info.batch_stats:
            raise ValueError(
                "the model normalizes with batch statistics in eval mode (track_running_stats="
                "False): images are not independent; give its norm layers running statistics"
            )
        keep, idle_note = _called_layers(model, names, layers is not None, info)
        if len(keep) < len(names):
            names, modules, params = [names[i] for i in keep], [modules[i] for i in keep], [params[i] for i in keep]
            info = inspect_model(model, modules, x0, names)
            notes.append(idle_note)
        att = _attention_note(model)
        if att:
            notes.append(att)
        loss_fn = resolve_loss(opts.loss)
        probe = (x0[:2], first[1][:2].to(ref.device))
        with estimation_mode(model, params):  # the probe checks need gradients of the weights
            choice = choose(opts, info, names, model, params, probe, loss_fn)
        used = choice.method
        notes.extend(choice.notes)
        n_params = input_numels(model, modules, x0) if activations else [p.numel() for p in params]
        if opts.diagonal and not BY_NAME[used].gauss_newton:
            raise ValueError("diagonal=True needs a Gauss-Newton method (exact, hybrid, mc_fisher, mc_fisher_is)")
        if opts.diagonal and used == "gn_residual":
            raise ValueError("diagonal=True gives Gauss-Newton diagonals: pass method='hybrid' (or 'exact')")
        plan = ChunkPlan(batch_dims=tuple(info.batch_dims))
        if BY_NAME[used].gauss_newton:
            k = 2 if choice.loss_gn else _vectors_per_image(used, info.width)
            plan = plan_chunk(model, modules, _to_model(first[0][:1], ref), opts.chunk_size, k,
                              available_memory_bytes(ref.device), info.batch_dims)
        key = json.dumps(
            {
                "method": used,
                "loss_gn": choice.loss_gn,
                "layers": names,
                "seed": opts.seed,
                "loss": str(opts.loss),
                "chunk": opts.chunk_size,
                "ppb": opts.probes_for(used),
                "diag": opts.diagonal,
                "activations": activations,
                "weights": weights_hash(model, names),
            }
        )
        run = EstimationRun(names, n_params, opts.seed, opts.diagonal, params, activations, choice.curved, plan)
        run.loss_gn = choice.loss_gn
        run.maybe_resume(opts.state_path, key)
        _loop(run, model, modules, used, stream, loss_fn, ref, opts, key)
    if used == "hutchinson" and not activations and run.stats.count < 2:
        notes.append("one chunk of data only: the standard errors cover probe noise, not data sampling")
    result = run.result(used, opts.rel_tol, opts.min_share, time.perf_counter() - t0, notes, choice.reason)
    _warn_unconverged(result, opts)
    return result


def _vectors_per_image(method: str, width: int) -> int:
    from hawq.hessian.persample import EXACT_CLASSES, TAIL_SAMPLES, TOP_CLASSES

    if method == "exact":
        return width
    if method in ("hybrid", "gn_residual"):
        return width if width <= EXACT_CLASSES else TOP_CLASSES + TAIL_SAMPLES
    return 1


def _loop(run: EstimationRun, model, modules, used, stream, loss_fn, ref, opts: TraceOptions, key: str) -> None:
    """Consume chunks until converged, `max_images` or `max_probes`; save running sums as it goes."""
    max_images, state_path = opts.max_images, opts.state_path
    bar = tqdm(total=max_images, disable=not opts.progress, desc=f"traces ({used})", unit="img", initial=run.images)
    last_save = time.perf_counter()
    skip = run.images
    probes = used == "hutchinson" and not opts.activations
    min_count = 5 if probes else min(2 * opts.chunk_size, 128)

    def finished() -> bool:
        enough = run.stats.count >= min_count and (not run.curved or run.residual.count >= 5)
        return enough and all(run.done(opts.rel_tol, opts.min_share))

    for x, y in [] if run.images > 0 and finished() else stream:
        if skip > 0:
            if x.shape[0] > skip:  # the resumed run stopped inside this chunk (a max_images cut)
                x, y = x[skip:], y[skip:]
                skip = 0
            else:
                skip -= x.shape[0]
                continue
        if max_images is not None and run.images >= max_images:
            break
        if probes and run.n_probes >= opts.max_probes:
            break
        if max_images is not None:
            x, y = x[: max_images - run.images], y[: max_images - run.images]
        x, y = _to_model(x, ref), y.to(ref.device)
        n_probes = opts.probes_for(used)
        if probes:
            n_probes = min(n_probes, max(1, opts.max_probes - run.n_probes))
        try:
            run.step(model, modules, used, x, y, loss_fn, n_probes)
        except (torch.OutOfMemoryError, MemoryError) as e:
            raise ValueError(
                f"out of memory on a chunk of {x.shape[0]} images: pass a smaller chunk_size (now {opts.chunk_size})"
            ) from e
        bar.update(x.shape[0])
        if state_path is not None and time.perf_counter() - last_save > _SAVE_EVERY_S:
            run.save(state_path, key)
            last_save = time.perf_counter()
        if finished():
            break
    bar.close()
    if state_path is not None:
        run.save(state_path, key)


def _warn_unconverged(result: TraceResult, opts: TraceOptions) -> None:
    worst = [lt for lt in result.layers if not lt.converged]
    if worst:
        w = max(worst, key=lambda lt: lt.rel_stderr)
        warnings.warn(
            f"traces stopped before reaching rel_tol={opts.rel_tol} on {len(worst)} of {len(result.layers)} layers "
            f"(worst {w.fqn}: {100 * w.rel_stderr:.1f}% after {result.n_images} images): pass more data or a "
            "larger max_images",
            stacklevel=3,
        )
