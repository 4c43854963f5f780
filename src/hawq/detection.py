"""The detection task behind the pipeline's stages: RetinaNet on the Fashion-MNIST detection set, scored
by COCO mAP (pycocotools). The set is generated once from the Fashion-MNIST files into the cache."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Subset

from hawq.classification import cache_dir, cached_or_trained, load_state_into
from hawq.config import RunConfig
from hawq.data.detection_synth import (
    CachedDetection,
    detection_loader,
    load_detection_split,
    make_detection_set,
)
from hawq.data.fashion_mnist import find_data_dir
from hawq.tasks.detection import (
    create_detector,
    detection_loss_fn,
    evaluate_map,
    fixed_layers,
    hessian_batches,
    train_detector,
)

SET_SIZES = {False: (2000, 500), True: (64, 32)}  # (train, val) canvases; True: --quick


@dataclass
class DetectionData:
    train: CachedDetection
    val: CachedDetection


class DetectionTask:
    name = "detection"
    metric = "map50"
    metrics = ("map50", "map")

    def load_data(self, cfg: RunConfig) -> DetectionData:
        fmnist = find_data_dir(cfg.data_dir, cfg.download)
        n_train, n_val = SET_SIZES[cfg.quick]
        root = cache_dir() / "data" / f"fmnist-detection-{n_train}-{n_val}"
        paths = make_detection_set(root, fmnist_dir=fmnist, n_train=n_train, n_val=n_val)
        return DetectionData(load_detection_split(paths, "train"), load_detection_split(paths, "val"))

    def build_model(self, cfg: RunConfig) -> nn.Module:
        if cfg.model != "retinanet_tiny":
            raise ValueError(f"unknown detection model {cfg.model!r}: the detection task takes retinanet_tiny")
        return create_detector(seed=cfg.seed)

    def load_state_into(self, model: nn.Module, path: str | Path) -> None:
        load_state_into(model, path)

    def full_precision_model(self, cfg: RunConfig, data: DetectionData, progress: bool) -> tuple[nn.Module, dict]:
        model = self.build_model(cfg)
        if cfg.checkpoint is not None:
            load_state_into(model, cfg.checkpoint)
            return model.to(cfg.device).eval(), {"source": f"checkpoint {cfg.checkpoint}"}
        epochs = 1 if cfg.quick else cfg.epochs
        ident = {"task": "detection", "model": cfg.model, "dataset": cfg.dataset, "image_size": cfg.image_size,
                 "n_train": len(data.train), "epochs": epochs,
                 "lr": cfg.lr, "batch_size": cfg.batch_size, "seed": cfg.seed, "flip": True, "algo": 1}
        key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

        def train(m: nn.Module) -> dict:
            loader = detection_loader(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed, flip=True)
            return {"final_loss": train_detector(m, loader, epochs=epochs, lr=cfg.lr, seed=cfg.seed,
                                                 progress=progress)[-1]}

        return cached_or_trained(model, lambda: self.build_model(cfg),
                                 cache_dir() / "fp32" / f"{cfg.model}-detection-{key}.pt", cfg.device, train,
                                 {"cache_key": key}, ident, retrain=cfg.retrain)

    def evaluate(self, model: nn.Module, data: DetectionData, progress: bool) -> dict[str, float]:
        scores = evaluate_map(model, detection_loader(data.val, 32), progress=progress)
        return {"map50": 100.0 * scores["map50"], "map": 100.0 * scores["map"]}

    def example_input(self, data: DetectionData) -> torch.Tensor:
        return data.train.images[:1]

    def trace_batches(self, cfg: RunConfig, data: DetectionData):
        return hessian_batches(detection_loader(data.train, cfg.trace_batch_size, shuffle=True, seed=cfg.seed + 1))

    def trace_loss(self, model: nn.Module):
        return detection_loss_fn(model)

    def fixed_layers(self, model: nn.Module, bits: int = 8) -> dict[str, int]:
        return fixed_layers(model, bits)

    def calibration_batches(self, data: DetectionData):
        return ((data.train.images[i : i + 32],) for i in range(0, len(data.train), 32))

    def finetune(self, model: nn.Module, data: DetectionData, cfg: RunConfig, n_images: int,
                 teacher: nn.Module | None, progress: bool, desc: str) -> dict:
        g = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(len(data.train), generator=g)[: min(n_images, len(data.train))].tolist()
        epochs = max(1, round(n_images / len(data.train))) if n_images > len(data.train) else 1
        loader = detection_loader(Subset(data.train, order), cfg.batch_size, shuffle=True, seed=cfg.seed, flip=True)
        train_detector(model, loader, epochs=epochs, lr=cfg.ft_lr, seed=cfg.seed, progress=progress)
        return {"n_images": len(order) * epochs, "epochs": epochs, "lr": cfg.ft_lr, "batch_size": cfg.batch_size}
