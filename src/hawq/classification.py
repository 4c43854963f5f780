"""The classification task: data, model construction, the full-precision model and its cache."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Subset

from hawq.config import RunConfig
from hawq.data.fashion_mnist import TensorDataset, batches, load_split
from hawq.distributed import rank, world_size, wrap_ddp
from hawq.io import load_torch, save_torch
from hawq.models import create_model
from hawq.quant import decompose_attention_
from hawq.train import TrainConfig, evaluate, train

DATASET_SHAPES = {"fashion_mnist": (1, 10)}  # in_channels, num_classes


@dataclass
class ClassificationData:
    train: TensorDataset
    test: TensorDataset
    train_all: TensorDataset | None = None  # the whole training split when `train` is a --quick subset


def load_data(cfg: RunConfig) -> ClassificationData:
    full = load_split("train", cfg.data_dir, cfg.download)
    te = load_split("test", cfg.data_dir, cfg.download).subset(cfg.test_images)
    return ClassificationData(full.subset(cfg.train_images), te, full)


def build_model(cfg: RunConfig) -> nn.Module:
    in_channels, num_classes = DATASET_SHAPES[cfg.dataset]
    torch.manual_seed(cfg.seed)  # the initial weights come from the run's seed
    kw = {} if cfg.weights is None else {"weights": cfg.weights}
    model = create_model(cfg.model, in_channels=in_channels, num_classes=cfg.num_classes or num_classes, **kw)
    decompose_attention_(model)  # attention projections become quantizable Linear layers (after --weights load)
    return model


def fp_train_config(cfg: RunConfig, n_train: int) -> TrainConfig:
    epochs = 1 if cfg.quick else cfg.epochs
    return TrainConfig(n_images=epochs * n_train, batch_size=cfg.batch_size, lr=cfg.lr,
                       weight_decay=cfg.weight_decay, seed=cfg.seed)


def cache_dir() -> Path:
    return Path(os.environ.get("HAWQ_CACHE", Path.home() / ".cache" / "hawq"))


# Full-precision models shipped with hawq, made by its own training (`scripts/make_bundled.py`), under the name
# their cache file would have; one is used only when its training data's fingerprint matches the data at hand.
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"


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


def cache_key(cfg: RunConfig, tcfg: TrainConfig, n_train: int) -> str:
    ident = {"model": cfg.model, "dataset": cfg.dataset, "n_train": n_train, "train": tcfg.to_dict(), "algo": 2,
             "image_size": cfg.image_size, "num_classes": cfg.num_classes}
    path, sep, _ = cfg.model.rpartition(":")
    if sep and path.endswith(".py") and Path(path).is_file():  # a user's model file: its content too
        ident["model_file_sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _cache_stem(model: str) -> str:
    """A file-name-safe stem for a model name ("path/to/net.py:build" -> "net.py-build")."""
    path, sep, fn = model.rpartition(":")
    name = f"{Path(path).name}-{fn}" if sep and path.endswith(".py") else model
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name)


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


def full_precision_model(
    cfg: RunConfig, data: ClassificationData, progress: bool = True, build=None
) -> tuple[nn.Module, dict]:
    """Train (or load from --checkpoint, --weights or the cache) the full-precision model; returns it and its
    record. `build(cfg)` makes the model (default: `build_model`)."""
    build = build or build_model
    model = build(cfg)
    if cfg.weights is not None and cfg.checkpoint is None:
        return model.to(cfg.device).eval(), {"source": f"weights {cfg.weights}"}
    if cfg.checkpoint is not None:
        load_state_into(model, cfg.checkpoint)
        return model.to(cfg.device).eval(), {"source": f"checkpoint {cfg.checkpoint}"}
    if cfg.quick and getattr(data, "train_all", None) is not None and not cfg.retrain:
        # a smoke run borrows the full run's model where one is cached or bundled: its comparison then means
        # something; otherwise it trains one epoch on its few images
        full = cfg.replace(quick=False)
        tcfg = fp_train_config(full, len(data.train_all))
        name = cache_file_name(full, cache_key(full, tcfg, len(data.train_all)))
        for path in (cache_dir() / "fp32" / name, bundled_model(name, data.train_all)):
            if path is not None and path.exists():
                try:
                    load_state_into(model, path)
                except ValueError:
                    model = build(cfg)
                    continue
                return model.to(cfg.device).eval(), {"source": f"{_source(path)} (the full run's model)",
                                                     "train": tcfg.to_dict()}
    tcfg = fp_train_config(cfg, len(data.train))
    key = cache_key(cfg, tcfg, len(data.train))
    name = cache_file_name(cfg, key)
    cached = cache_dir() / "fp32" / name
    return cached_or_trained(
        model, lambda: build(cfg), cached, cfg.device,
        lambda m: train_data_parallel(m, data.train, tcfg, progress=progress, desc="train fp32"),
        {"cache_key": key, "train": tcfg.to_dict()}, tcfg.to_dict(),
        bundled=None if cfg.retrain else bundled_model(name, data.train), retrain=cfg.retrain)


def cache_file_name(cfg: RunConfig, key: str) -> str:
    return f"{_cache_stem(cfg.model)}-{cfg.dataset}-{key}.pt"


def _source(path: Path) -> str:
    return f"bundled {path.name}" if path.parent == BUNDLED_DIR else f"cache {path}"


def make_bundled(cfg: RunConfig, out_dir: Path, progress: bool = True) -> tuple[Path, dict]:
    """Train the full-precision model of `cfg` from its recipe (never from a cache or a bundle) and write it
    to `out_dir` under the name hawq looks for, with its training data's fingerprint; returns the path and
    the record (test top-1, torch version, threads). `scripts/make_bundled.py` fills `BUNDLED_DIR` with it."""
    data = load_data(cfg)
    if data.train_all is not None and len(data.train_all) != len(data.train):
        raise ValueError("a bundled model is trained on the whole training split: drop --quick")
    tcfg = fp_train_config(cfg, len(data.train))
    model = build_model(cfg).to(cfg.device)
    stats = train_data_parallel(model, data.train, tcfg, progress=progress, desc="train fp32")
    record = {"top1": evaluate(model, data.test), "torch": str(torch.__version__), "threads": torch.get_num_threads(),
              **stats}
    path = Path(out_dir) / cache_file_name(cfg, cache_key(cfg, tcfg, len(data.train)))
    save_torch(path, {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "train": tcfg.to_dict(),
                      "train_data": {"fingerprint": data_fingerprint(data.train), "n": len(data.train)},
                      "made_with": record})
    return path, record


def cached_or_trained(model: nn.Module, rebuild, cached: Path, device, train_fn, record: dict,
                      train_record, bundled: Path | None = None, retrain: bool = False) -> tuple[nn.Module, dict]:
    """The model from the cache file `cached` when it loads, else from the `bundled` checkpoint, else trained
    by `train_fn(model)` (which returns a dict of statistics) and saved in the cache atomically. `retrain`
    skips both. `rebuild()` makes a fresh model after a failed load; `record` goes into the returned record,
    `train_record` into the cache file."""
    for path in () if retrain else (cached, bundled):
        if path is None or not path.exists():
            continue
        try:
            load_state_into(model, path)
            return model.to(device).eval(), {"source": _source(path), **record}
        except ValueError as e:
            kind = "bundled" if path.parent == BUNDLED_DIR else "cached"
            print(f"hawq: ignoring the {kind} model ({e}); training again", file=sys.stderr)
            model = rebuild()
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


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


__all__ = ["ClassificationData", "build_model", "clone", "evaluate", "full_precision_model", "load_data"]


class ClassificationTask:
    """The default task behind the pipeline's stages: image classification scored by top-1 accuracy."""

    name = "classification"
    metric = "top1"  # percent
    metrics = ("top1",)

    def load_data(self, cfg: RunConfig) -> ClassificationData:
        return load_data(cfg)

    def build_model(self, cfg: RunConfig) -> nn.Module:
        return build_model(cfg)

    def load_state_into(self, model: nn.Module, path: str | Path) -> None:
        load_state_into(model, path)

    def full_precision_model(self, cfg: RunConfig, data: ClassificationData, progress: bool) -> tuple[nn.Module, dict]:
        return full_precision_model(cfg, data, progress)

    def evaluate(self, model: nn.Module, data: ClassificationData, progress: bool) -> dict[str, float]:
        return {"top1": evaluate(model, data.test, progress=progress)}

    def example_input(self, data: ClassificationData) -> torch.Tensor:
        return data.train.images[:1]

    def trace_batches(self, cfg: RunConfig, data: ClassificationData):
        return batches(data.train, cfg.trace_batch_size, shuffle=True, seed=cfg.seed + 1)

    def trace_loss(self, model: nn.Module) -> str:
        return "cross_entropy"

    def fixed_layers(self, model: nn.Module, bits: int = 8) -> dict[str, int] | None:
        return None  # the allocator's default: first and last quantizable layer

    def calibration_batches(self, data: ClassificationData):
        return batches(data.train, 256)

    def export_batches(self, data: ClassificationData):
        """(inputs, labels) on which the exported model is checked against PyTorch: the test set."""
        return batches(data.test, 500)

    def finetune(self, model: nn.Module, data: ClassificationData, cfg: RunConfig, n_images: int,
                 teacher: nn.Module | None, progress: bool, desc: str) -> dict:
        tcfg = TrainConfig(n_images=n_images, batch_size=cfg.ft_batch_size, lr=cfg.ft_lr, weight_decay=1e-4,
                           seed=cfg.seed, distill_temperature=4.0 if teacher is not None else None)
        train_data_parallel(model, data.train, tcfg, teacher=teacher, progress=progress, desc=desc)
        return {**tcfg.to_dict(), "processes": world_size()}
