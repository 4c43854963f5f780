"""The classification task: data, model construction, the full-precision model and its cache."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hawq.artifacts import save_torch
from hawq.config import RunConfig
from hawq.data.fashion_mnist import TensorDataset, batches, load_split
from hawq.distributed import world_size
from hawq.models import create_model
from hawq.quant import decompose_attention_
from hawq.tasks import fp32
from hawq.tasks.base import Task
from hawq.tasks.fp32 import cache_dir, load_state_into, train_data_parallel
from hawq.train import TrainConfig, evaluate

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
        model, path = fp32.load_first(model, lambda: build(cfg), _cached_or_bundled(name, data.train_all), warn=False)
        if path is not None:
            return model.to(cfg.device).eval(), {"source": f"{fp32.source_of(path)} (the full run's model)",
                                                 "train": tcfg.to_dict()}
    tcfg = fp_train_config(cfg, len(data.train))
    key = cache_key(cfg, tcfg, len(data.train))
    name = cache_file_name(cfg, key)
    cached, bundled = _cached_or_bundled(name, data.train) if not cfg.retrain else (cache_dir() / "fp32" / name, None)
    return fp32.cached_or_trained(
        model, lambda: build(cfg), cached, cfg.device,
        lambda m: train_data_parallel(m, data.train, tcfg, progress=progress, desc="train fp32"),
        {"cache_key": key, "train": tcfg.to_dict()}, tcfg.to_dict(), bundled=bundled, retrain=cfg.retrain)


def _cached_or_bundled(name: str, train: TensorDataset) -> tuple[Path, Path | None]:
    """The cache file `name`, and the bundled model of that name trained on `train` when the cache has none
    (the data's fingerprint is only computed then)."""
    cached = cache_dir() / "fp32" / name
    return cached, None if cached.exists() else fp32.bundled_model(name, train)


def cache_file_name(cfg: RunConfig, key: str) -> str:
    return f"{_cache_stem(cfg.model)}-{cfg.dataset}-{key}.pt"


def make_bundled(cfg: RunConfig, out_dir: Path, progress: bool = True) -> tuple[Path, dict]:
    """Train the full-precision model of `cfg` from its recipe (never from a cache or a bundle) and write it
    to `out_dir` under the name hawq looks for, with its training data's fingerprint; returns the path and
    the record (test top-1, torch version, threads). `scripts/make_bundled.py` fills `fp32.BUNDLED_DIR` with it."""
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
                      "train_data": {"fingerprint": fp32.data_fingerprint(data.train), "n": len(data.train)},
                      "made_with": record})
    return path, record


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


__all__ = ["ClassificationData", "ClassificationTask", "build_model", "clone", "evaluate", "full_precision_model",
           "load_data"]


class ClassificationTask(Task):
    """The default task behind the pipeline's stages: image classification scored by top-1 accuracy."""

    name = "classification"
    metric = "top1"  # percent
    metrics = ("top1",)
    defaults = {"model": "resnet20", "epochs": 3, "batch_size": 128, "lr": 0.1, "ft_images": 10240, "ft_lr": 0.005,
                "trace_max_images": 8192}

    def load_data(self, cfg: RunConfig) -> ClassificationData:
        return load_data(cfg)

    def build_model(self, cfg: RunConfig) -> nn.Module:
        return build_model(cfg)

    def full_precision_model(self, cfg: RunConfig, data: ClassificationData, progress: bool) -> tuple[nn.Module, dict]:
        return full_precision_model(cfg, data, progress)

    def evaluate(self, model: nn.Module, data: ClassificationData, progress: bool) -> dict[str, float]:
        return {"top1": evaluate(model, data.test, progress=progress)}

    def example_input(self, data: ClassificationData) -> torch.Tensor:
        return data.train.images[:1]

    def trace_batches(self, cfg: RunConfig, data: ClassificationData):
        return batches(data.train, cfg.trace_batch_size, shuffle=True, seed=cfg.seed + 1)

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
