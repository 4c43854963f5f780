"""The full-precision model every task starts from: trained once, then loaded from the cache (or from a model
bundled with hawq); checkpoints loaded with one-line errors; data-parallel training over a torchrun group."""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import replace
from pathlib import Path

from torch import nn
from torch.utils.data import Subset

from hawq.artifacts import load_torch, save_torch
from hawq.data.fashion_mnist import TensorDataset
from hawq.distributed import rank, world_size, wrap_ddp
from hawq.train import TrainConfig, train


def cache_dir() -> Path:
    return Path(os.environ.get("HAWQ_CACHE", Path.home() / ".cache" / "hawq"))


# Full-precision models shipped with hawq, made by its own training (`scripts/make_bundled.py`), under the name
# their cache file would have; one is used only when its training data's fingerprint matches the data at hand.
BUNDLED_DIR = Path(__file__).resolve().parents[1] / "bundled"


def data_fingerprint(data: TensorDataset) -> str:
    """sha256 of a data set's images and labels as loaded (after normalisation), 16 hex digits."""
    h = hashlib.sha256()
    h.update(data.images.contiguous().numpy().tobytes())
    h.update(data.labels.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def bundled_model(file_name: str, data) -> Path | None:
    """The bundled checkpoint named `file_name` when there is one trained on `data`, else None."""
    path = BUNDLED_DIR / file_name
    if not path.exists() or not isinstance(data, TensorDataset):
        return None
    try:
        made_on = load_torch(path).get("train_data", {}).get("fingerprint")
    except ValueError:
        return None
    return path if made_on == data_fingerprint(data) else None


def load_state_into(model: nn.Module, path: str | Path) -> None:
    """Load a state dict (raw, or under "state_dict"/"model" keys) with a clear error on mismatch."""
    obj = load_torch(path)
    state = obj.get("state_dict", obj.get("model", obj)) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds no state dict: save model.state_dict()")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"checkpoint {path} does not fit the model ({first}): check --model") from e


def source_of(path: Path) -> str:
    return f"bundled {path.name}" if path.parent == BUNDLED_DIR else f"cache {path}"


def load_first(model: nn.Module, rebuild, paths, warn: bool = True) -> tuple[nn.Module, Path | None]:
    """`model` holding the first of `paths` that loads (None entries and missing files skipped), and that path;
    (a fresh `rebuild()` model, None) when none does. A file that does not load is named on stderr (`warn`)."""
    for path in paths:
        if path is None or not path.exists():
            continue
        try:
            load_state_into(model, path)
            return model, path
        except ValueError as e:
            if warn:
                kind = "bundled" if path.parent == BUNDLED_DIR else "cached"
                print(f"hawq: ignoring the {kind} model ({e}); training again", file=sys.stderr)
            model = rebuild()
    return model, None


def cached_or_trained(model: nn.Module, rebuild, cached: Path, device, train_fn, record: dict,
                      train_record, bundled: Path | None = None, retrain: bool = False) -> tuple[nn.Module, dict]:
    """The model from the cache file `cached` when it loads, else from the `bundled` checkpoint, else trained
    by `train_fn(model)` (which returns a dict of statistics) and saved in the cache atomically. `retrain`
    skips both. `rebuild()` makes a fresh model after a failed load; `record` goes into the returned record,
    `train_record` into the cache file."""
    model, path = load_first(model, rebuild, () if retrain else (cached, bundled))
    if path is not None:
        return model.to(device).eval(), {"source": source_of(path), **record}
    model.to(device)
    stats = train_fn(model)
    save_torch(cached, {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "train": train_record})
    return model.eval(), {"source": "trained", **record, **stats}


def train_data_parallel(model: nn.Module, data, tcfg: TrainConfig, *, teacher: nn.Module | None = None,
                        progress: bool = True, desc: str = "train") -> dict:
    """`train` on one process, or DistributedDataParallel over a torchrun group: each rank trains on its
    own slice of the data and of the images (gradients are averaged, so the global batch is W times larger)."""
    w = world_size()
    if w == 1:
        return train(model, data, tcfg, teacher=teacher, progress=progress, desc=desc)
    r = rank()
    if isinstance(data, TensorDataset):
        part = TensorDataset(data.images[r::w], data.labels[r::w])
    else:
        part = Subset(data, list(range(r, len(data), w)))
    local = replace(tcfg, n_images=max(1, tcfg.n_images // w), seed=tcfg.seed * 1000 + r)
    stats = train(wrap_ddp(model), part, local, teacher=teacher, progress=progress and r == 0, desc=desc)
    model.eval()
    return stats
