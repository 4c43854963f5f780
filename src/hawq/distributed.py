"""Data-parallel runs over torch.distributed, launched by `torchrun` (or any launcher that sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT).

- Traces: every rank estimates on its own shard of the data (with its own probe seed) and the per-layer
  results are pooled exactly as if one process had seen every sample: counts, sums and sums of squares
  of the iid per-sample values are added (`combine_traces`), so the pooled standard error is the one of
  the union of the shards.
- Fine-tuning: `wrap_ddp` (DistributedDataParallel, gradients averaged by all-reduce) and `shard_loader`
  (DistributedSampler; every rank gets the same number of batches, so no rank waits forever).
- Artifacts: only rank 0 writes (`is_main`); the others wait at `barrier` where it matters.
- `autocast` is for forward passes of training and evaluation on CUDA (bfloat16 where supported, else
  float16); trace estimation stays in float32, where rounding would swamp small curvatures.

Without a launcher (WORLD_SIZE unset or 1) every helper is a no-op on one process.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from hawq.hessian.result import LayerTrace, TraceResult, convergence

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: str  # "cpu" or "cuda:<local_rank>"
    backend: str | None  # None on a single process

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, "local_rank": self.local_rank,
                "device": self.device, "backend": self.backend}


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer: check the launcher") from None


def init_from_env(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group that torchrun describes in the environment (gloo on CPU, nccl on CUDA).

    `device`: "auto" (CUDA if available), "cpu" or "cuda". Each rank uses GPU LOCAL_RANK. Calling it again
    once initialized returns the same answer.
    """
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device {device!r} is unknown: use auto, cpu or cuda")
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device: use --device cpu")
    ws, rk, local = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    dev = f"cuda:{local}" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    if ws <= 1 and not dist.is_initialized():
        return DistInfo(0, 1, 0, dev, None)
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend, init_method="env://", rank=rk, world_size=ws,
                                timeout=timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev, dist.get_backend())


def cleanup() -> None:
    """Leave the process group (safe to call on one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """True on rank 0 (and on a single process): the one that writes artifacts and prints."""
    return rank() == 0


def barrier() -> None:
    if _active() and world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (a no-op on one process); returns it."""
    if _active() and world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj: T) -> list[T]:
    """Every rank's `obj` (picklable), in rank order."""
    if not (_active() and world_size() > 1):
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s `obj` on every rank."""
    if not (_active() and world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard(items: Sequence[T] | Iterable[T]) -> list[T] | Iterator[T]:
    """This rank's share: items rank, rank + W, rank + 2W, ... (a list for sequences, else an iterator)."""
    r, w = rank(), world_size()
    if isinstance(items, Sequence):
        return [items[i] for i in range(r, len(items), w)]
    return (x for i, x in enumerate(items) if i % w == r)


def shard_loader(loader: DataLoader, shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> DataLoader:
    """The same loader over this rank's part of `loader.dataset` (DistributedSampler; padded so every rank
    has as many batches). Call `loader.sampler.set_epoch(epoch)` each epoch for a new shuffle."""
    if world_size() == 1:
        return loader
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(loader.dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle,
                                 seed=seed, drop_last=drop_last)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last)


def wrap_ddp(model: nn.Module, device: str | torch.device | None = None, **kwargs: Any) -> nn.Module:
    """DistributedDataParallel around `model` on several processes; `model` itself on one.

    Fake-quant layers share their parameters with the float ones, so wrap after `quantize_` and
    `calibrate_`: the calibrated ranges are buffers, which DDP broadcasts from rank 0.
    """
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = torch.device(device) if device is not None else next(model.parameters()).device
    if dev.type == "cuda":
        return DDP(model, device_ids=[dev.index if dev.index is not None else torch.cuda.current_device()],
                   **kwargs)
    return DDP(model, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (what to save and evaluate)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def amp_dtype(device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype that is safe on `device`: bfloat16 on CUDA with bf16 support, float16 on other
    CUDA devices (use a GradScaler then), None (no autocast) on CPU."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: str | torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed precision for training/evaluation forwards on CUDA; a null context on CPU or when disabled."""
    dtype = amp_dtype(device)
    if not enabled or dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


# --- traces over several processes ------------------------------------------------------------------


def _pool(counts: Sequence[int], means: Sequence[float], stderrs: Sequence[float]) -> tuple[int, float, float]:
    """(n, mean, stderr) of the union of groups of iid samples, each given by its (n, mean, stderr).

    A group's sum of squares is (n-1)*n*stderr^2 + n*mean^2 (stderr = sd/sqrt(n)); a group of one
    sample has no spread of its own (its stderr is inf) and adds mean^2.
    """
    n = sum(counts)
    if n == 0:
        return 0, 0.0, math.inf
    s = sum(c * m for c, m in zip(counts, means))
    ss = 0.0
    for c, m, e in zip(counts, means, stderrs):
        if c == 0:
            continue
        spread = (c - 1) * c * e * e if c > 1 else 0.0
        if not math.isfinite(spread):
            raise ValueError("a group of two or more samples has an infinite standard error: cannot pool it")
        ss += spread + c * m * m
    mean = s / n
    if n < 2:
        return n, mean, math.inf
    var = max((ss - n * mean * mean) / (n - 1), 0.0)
    return n, mean, math.sqrt(var / n)


def _combine_history(results: Sequence[TraceResult], fqn: str) -> list[list[float]]:
    """Row k pools row k of every rank: images added, means weighted by images, errors in quadrature."""
    rows = [r.history.get(fqn, []) for r in results]
    out = []
    for k in range(min(len(h) for h in rows) if rows else 0):
        imgs = [h[k][0] for h in rows]
        total = sum(imgs)
        if total <= 0:
            continue
        mean = sum(i * h[k][1] for i, h in zip(imgs, rows)) / total
        err = math.sqrt(sum((i / total) ** 2 * h[k][2] ** 2 for i, h in zip(imgs, rows)))
        out.append([float(total), mean, err])
    return out


def combine_traces(
    results: Sequence[TraceResult], rel_tol: float | None = None, min_share: float = 0.01
) -> TraceResult:
    """Pool per-rank trace estimates of the same layers into one, as if one process had seen all samples.

    Per layer: n = sum n_r, mean = sum n_r m_r / n, and the standard error from the pooled sums of
    squares. `converged` is recomputed for `rel_tol`/`min_share` when `rel_tol` is given, else it is the
    AND over ranks. Diagonals (if every rank has them) are averaged weighted by images.
    """
    if not results:
        raise ValueError("combine_traces needs at least one TraceResult")
    first = results[0]
    names = [lt.fqn for lt in first.layers]
    for r in results[1:]:
        if [lt.fqn for lt in r.layers] != names:
            raise ValueError("the ranks estimated different layers: pass the same `layers` on every rank")
        if r.method != first.method:
            raise ValueError(f"the ranks used different methods ({first.method}, {r.method}): pass method=")
    layers = []
    for i, fqn in enumerate(names):
        per = [r.layers[i] for r in results]
        n, mean, err = _pool([lt.n_samples for lt in per], [lt.trace for lt in per], [lt.stderr for lt in per])
        layers.append(LayerTrace(fqn, per[0].n_params, mean, err, n, all(lt.converged for lt in per)))
    if rel_tol is not None:
        flags = convergence(torch.tensor([lt.trace for lt in layers], dtype=torch.float64),
                            torch.tensor([lt.stderr for lt in layers], dtype=torch.float64),
                            [lt.n_params for lt in layers], rel_tol, min_share)
        layers = [LayerTrace(lt.fqn, lt.n_params, lt.trace, lt.stderr, lt.n_samples, ok)
                  for lt, ok in zip(layers, flags)]
    diagonals = None
    if all(r.diagonals for r in results):
        total = sum(r.n_images for r in results)
        diagonals = {f: sum(r.diagonals[f] * (r.n_images / total) for r in results) for f in first.diagonals}
    notes = tuple(dict.fromkeys(n for r in results for n in r.notes))
    return TraceResult(
        method=first.method,
        layers=tuple(layers),
        n_images=sum(r.n_images for r in results),
        n_backward=sum(r.n_backward for r in results),
        wall_s=max(r.wall_s for r in results),
        history={f: _combine_history(results, f) for f in names},
        notes=notes + ((f"pooled over {len(results)} processes",) if len(results) > 1 else ()),
        reason=first.reason,
        diagonals=diagonals,
    )


def distributed_traces(
    model: nn.Module,
    batches: Iterable[Any],
    layers: Sequence[str] | None = None,
    *,
    rel_tol: float = 0.05,
    min_share: float = 0.01,
    max_images: int | None = 4096,
    seed: int = 0,
    shard_batches: bool = True,
    progress: bool = True,
    state_path: str | os.PathLike | None = None,
    **kwargs: Any,
) -> TraceResult:
    """`hawq.hessian.estimate_traces` split over the ranks; every rank returns the same pooled result.

    Each rank takes every W-th batch of `batches` (unless `shard_batches=False`, when `batches` is
    already this rank's shard), at most ceil(max_images / W) images, seed `seed + rank`, and stops at
    rel_tol * sqrt(W), so the pooled estimate reaches about `rel_tol`. Other keyword arguments go to
    `estimate_traces`. On one process this is `estimate_traces` itself.
    """
    from hawq.hessian import estimate_traces

    w, r = world_size(), rank()
    if w == 1:
        return estimate_traces(model, batches, layers, rel_tol=rel_tol, min_share=min_share,
                               max_images=max_images, seed=seed, progress=progress, state_path=state_path,
                               **kwargs)
    local = estimate_traces(
        model,
        shard(batches) if shard_batches else batches,
        layers,
        rel_tol=rel_tol * math.sqrt(w),
        min_share=min_share,
        max_images=None if max_images is None else math.ceil(max_images / w),
        seed=seed + r,
        progress=progress and is_main(),
        state_path=None if state_path is None else f"{os.fspath(state_path)}.rank{r}",
        **kwargs,
    )
    gathered = all_gather_object(local.to_dict())
    results = [TraceResult.from_dict(d) for d in gathered]
    if local.diagonals:
        results = _with_diagonals(results, local)
    return combine_traces(results, rel_tol=rel_tol, min_share=min_share)


def _with_diagonals(results: list[TraceResult], local: TraceResult) -> list[TraceResult]:
    """Give every gathered result the all-reduced image-weighted mean diagonal (one collective per layer)."""
    total = sum(r.n_images for r in results)
    mean = {}
    for f, d in (local.diagonals or {}).items():
        mean[f] = all_reduce_sum(d.detach().to(torch.float64) * (local.n_images / total)).to(d.dtype)
    return [TraceResult(r.method, r.layers, r.n_images, r.n_backward, r.wall_s, r.history, r.notes, r.reason,
                        diagonals=mean) for r in results]


def write_if_main(write: Any, *args: Any, **kwargs: Any) -> Any:
    """Call `write(*args, **kwargs)` on rank 0 only (e.g. `write_if_main(write_json, path, kind, d)`),
    then wait for it on every rank; returns what rank 0's call returned (None elsewhere)."""
    out = write(*args, **kwargs) if is_main() else None
    barrier()
    return out

