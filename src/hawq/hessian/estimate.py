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

from hawq.hessian.activations import input_numels
from hawq.hessian.detect import choose_method, inspect_model
from hawq.hessian.hutchinson import (
    LossFn,
    NoDoubleBackwardError,
    find_no_double_backward,
    resolve_loss,
)
from hawq.hessian.persample import (
    available_memory_bytes,
    check_memory,
    chunk_memory_bytes,
)
from hawq.hessian.result import TraceResult
from hawq.hessian.run import EstimationRun
from hawq.quant import quantizable_layers

METHODS = ("auto", "exact", "hybrid", "mc_fisher", "mc_fisher_is", "hutchinson")
_SAVE_EVERY_S = 2.0


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


def _validate(method, rel_tol, min_share, max_images, max_probes, chunk_size) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if not rel_tol > 0:
        raise ValueError(f"rel_tol must be > 0, got {rel_tol}")
    if not 0 <= min_share < 1:
        raise ValueError(f"min_share must be in [0, 1), got {min_share}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
    if max_probes < 1 or chunk_size < 1:
        raise ValueError("max_probes and chunk_size must be >= 1")


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
    probes_per_batch: int = 4,
) -> TraceResult:
    """Average Hessian trace Tr(H_l)/n_l of the loss w.r.t. each layer's weight, with standard errors.

    Methods:
      exact         per-image Gauss-Newton trace summed over all C classes (C backward passes per chunk);
                    equals the Hessian trace for cross-entropy on nets piecewise linear in each layer's
                    weights (ReLU, max-pool, eval batch norm, residual adds, avg-pool). No label noise.
      mc_fisher     the same with one label per image drawn from p_i (one backward pass; unbiased).
      mc_fisher_is  one label per image drawn from q_c ~ p_c ||p - e_c||^2 and weighted by p_c / q_c
                    (one backward pass; unbiased).
      hybrid        exact for uncertain images (1 - ||p_i||^2 >= 0.5, ~10% of a trained net's images),
                    mc_fisher_is for the others (unbiased). Measured on ResNet-20/Fashion-MNIST (bench/
                    trace.py): the per-image spread of exact at ~1.4x the cost of one backward per image;
                    mc_fisher_is alone is as good on typical images but its label noise on the rare
                    uncertain, heavy-tail images doubled the error (12% vs 5.6% at 4096 images).
      hutchinson    Rademacher probes v, v_l^T (H v)_l / n_l from Hessian-vector products that reuse one
                    gradient graph per chunk (`probes_per_batch` probes); any loss and network.
      auto          cross-entropy and no curved op (GELU, SiLU, Hardswish, sigmoid, tanh, softmax, norms
                    other than eval batch norm, products of two activations) -> hybrid; otherwise
                    hutchinson. If Hessian-vector products are impossible (an op without double backward)
                    and the loss is cross-entropy, falls back to exact with a warning and a note.
    Per-image contributions are heavy-tailed: on ResNet-20/Fashion-MNIST one image in ~5,000 carries
    ~100-1,000x the mean of the first layers (a genuine data effect, `exact` sees it too), so a run that
    meets such an image needs many more images than one that does not, and `max_images` then ends it with
    `converged=False` on those layers.
    Standard errors: per-image values (exact, mc_fisher) or per-chunk probe means (hutchinson) are iid, so
    stderr = std/sqrt(count) includes data sampling. Stopping: after each chunk, once every layer whose
    full trace n_l*trace_l is >= min_share of the sum has stderr <= rel_tol*trace, or at max_images images
    (hutchinson: also at max_probes probes). The model runs in eval mode; its train flags, requires_grad
    and parameters are left as they were. Same seed and batches -> identical `to_dict()` apart from wall_s.
    `state_path`: running sums are saved there (atomically) and a rerun with the same weights, data order
    and settings resumes from them, skipping the images already counted.
    `diagonal=True` (not hutchinson): `result.diagonals[fqn]` is the Gauss-Newton diagonal (shape of the
    weight), e.g. for Omega = 1/2 sum_j H_jj (Q(W)_j - W_j)^2.
    """
    return _estimate(
        model,
        batches,
        layers,
        False,
        method,
        loss,
        rel_tol,
        min_share,
        max_images,
        max_probes,
        chunk_size,
        seed,
        progress,
        diagonal,
        state_path,
        probes_per_batch,
    )


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
    gives every image's contribution; `n_samples` counts images. Methods, `auto` rule, stopping rule,
    standard errors, determinism and `state_path` are as in `estimate_traces` (the Gauss-Newton identity
    holds for activations of piecewise-linear nets too).
    """
    return _estimate(
        model,
        batches,
        layers,
        True,
        method,
        loss,
        rel_tol,
        min_share,
        max_images,
        max_probes,
        chunk_size,
        seed,
        progress,
        False,
        state_path,
        probes_per_batch,
    )


def _estimate(
    model,
    batches,
    layers,
    activations,
    method,
    loss,
    rel_tol,
    min_share,
    max_images,
    max_probes,
    chunk_size,
    seed,
    progress,
    diagonal,
    state_path,
    probes_per_batch,
) -> TraceResult:
    _validate(method, rel_tol, min_share, max_images, max_probes, chunk_size)
    if probes_per_batch < 1:
        raise ValueError(f"probes_per_batch must be >= 1, got {probes_per_batch}")
    t0 = time.perf_counter()
    names = resolve_layers(model, layers)
    mods = dict(model.named_modules())
    modules = [mods[n] for n in names]
    params = [m.weight for m in modules]
    ref = params[0]

    stream = _chunks(batches, chunk_size)
    try:
        first = next(stream)
    except StopIteration:
        raise ValueError("`batches` is empty: pass at least one (inputs, labels) batch") from None
    stream = itertools.chain([first], stream)

    with estimation_mode(model, [] if activations else params):
        x0 = _to_model(first[0], ref)
        curved, batch_stats, width = inspect_model(model, x0)
        n_params = input_numels(model, modules, x0) if activations else [p.numel() for p in params]
        if batch_stats:
            raise ValueError(
                "the model normalizes with batch statistics in eval mode (track_running_stats="
                "False): images are not independent; give its norm layers running statistics"
            )
        used, notes = choose_method(method, loss, curved, width)
        if diagonal and used == "hutchinson":
            raise ValueError("diagonal=True needs a Gauss-Newton method (exact, hybrid, mc_fisher, mc_fisher_is)")
        loss_fn = resolve_loss(loss)
        if used == "hutchinson" and not activations:
            bad = _hvp_failures(model, names, params, first, loss_fn, ref)
            if bad is not None:
                if method == "auto" and loss == "cross_entropy":
                    msg = (
                        f"no double backward through layers {', '.join(bad.layers)}: fell back to exact "
                        "(Gauss-Newton) traces"
                    )
                    warnings.warn(msg, stacklevel=2)
                    notes.append(msg)
                    used = "exact"
                else:
                    raise bad
        if used != "hutchinson":
            k = width if used in ("exact", "hybrid") else 1
            check_memory(
                chunk_memory_bytes(model, modules, _to_model(first[0][:chunk_size], ref), k),
                available_memory_bytes(),
                chunk_size,
            )
        key = json.dumps(
            {
                "method": used,
                "layers": names,
                "seed": seed,
                "loss": str(loss),
                "chunk": chunk_size,
                "ppb": probes_per_batch,
                "diag": diagonal,
                "activations": activations,
                "weights": weights_hash(model, names),
            }
        )
        run = EstimationRun(names, n_params, seed, diagonal, params, activations)
        run.maybe_resume(state_path, key)
        bar = tqdm(total=max_images, disable=not progress, desc=f"traces ({used})", unit="img", initial=run.images)
        last_save = time.perf_counter()
        skip = run.images
        min_count = 5 if used == "hutchinson" and not activations else min(2 * chunk_size, 128)
        resumed_done = run.images > 0 and run.stats.count >= min_count and all(run.done(rel_tol, min_share))
        for x, y in [] if resumed_done else stream:
            if skip > 0:
                skip -= x.shape[0]
                if skip < 0:
                    raise ValueError(f"{state_path} does not match the chunking of `batches`: delete it")
                continue
            if max_images is not None and run.images >= max_images:
                break
            if used == "hutchinson" and run.n_probes >= max_probes:
                break
            if max_images is not None:
                x, y = x[: max_images - run.images], y[: max_images - run.images]
            x, y = _to_model(x, ref), y.to(ref.device)
            try:
                run.step(model, modules, used, x, y, loss_fn, min(probes_per_batch, max_probes - run.n_probes))
            except (torch.OutOfMemoryError, MemoryError) as e:
                raise ValueError(
                    f"out of memory on a chunk of {x.shape[0]} images: pass a smaller chunk_size (now {chunk_size})"
                ) from e
            bar.update(x.shape[0])
            if state_path is not None and time.perf_counter() - last_save > _SAVE_EVERY_S:
                run.save(state_path, key)
                last_save = time.perf_counter()
            if run.stats.count >= min_count and all(run.done(rel_tol, min_share)):
                break
        bar.close()
        if state_path is not None:
            run.save(state_path, key)
    if used == "hutchinson" and not activations and run.stats.count < 2:
        notes.append("one chunk of data only: the standard errors cover probe noise, not data sampling")
    return run.result(used, rel_tol, min_share, time.perf_counter() - t0, notes)


def _hvp_failures(model, names, params, first, loss_fn, ref) -> NoDoubleBackwardError | None:
    x, y = _to_model(first[0][:2], ref), first[1][:2].to(ref.device)
    # per layer: a `once_differentiable` op gives a silently missing block, not an error
    bad = find_no_double_backward(model, names, params, x, y, loss_fn)
    return NoDoubleBackwardError(bad, "second derivative missing") if bad else None
