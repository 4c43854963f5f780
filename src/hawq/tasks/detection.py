"""The detection task behind the pipeline's stages: RetinaNet on the Fashion-MNIST detection set, scored
by COCO mAP (pycocotools); its loss for the traces (RetinaNet's own, on the dense head output of
`hawq.models.retinanet_tiny`), training and scoring. The set is generated once from the Fashion-MNIST files
into the cache."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Subset
from tqdm.auto import tqdm

from hawq.config import RunConfig
from hawq.data.coco import coco_map, load_coco
from hawq.data.detection_synth import (
    CachedDetection,
    detection_loader,
    load_detection_split,
    make_detection_set,
)
from hawq.data.fashion_mnist import find_data_dir
from hawq.models import create_model
from hawq.models.retinanet_tiny import Target, TinyRetinaNet
from hawq.tasks.base import Task
from hawq.tasks.fp32 import cache_dir, cached_or_trained, load_state_into

QUICK_SET = (64, 32)  # (train, val) canvases of a --quick run


@dataclass(frozen=True)
class TrainDefaults:
    """The default detection run, measured to fit 20 minutes on 2 CPU cores (see bench/detection.py)."""

    n_train: int = 2000
    n_val: int = 500
    batch_size: int = 32
    epochs: int = 16
    lr: float = 2e-3
    flip: bool = True
    ft_epochs: int = 2
    ft_lr: float = 2e-4
    trace_images: int = 512

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


TRAIN_DEFAULTS = TrainDefaults()


@dataclass
class DetectionData:
    train: CachedDetection
    val: CachedDetection


class DetectionTask(Task):
    name = "detection"
    metric = "map50"
    metrics = ("map50", "map")
    # AdamW on the detection set's training canvases (train_detector), from TRAIN_DEFAULTS
    defaults = {"model": "retinanet_tiny", "epochs": TRAIN_DEFAULTS.epochs, "batch_size": TRAIN_DEFAULTS.batch_size,
                "lr": TRAIN_DEFAULTS.lr, "ft_images": TRAIN_DEFAULTS.ft_epochs * TRAIN_DEFAULTS.n_train,
                "ft_lr": TRAIN_DEFAULTS.ft_lr, "trace_max_images": TRAIN_DEFAULTS.trace_images}
    refuses = {"export": "the ONNX export covers classifiers (a detector's box decoding and NMS are not exported)"}

    def load_data(self, cfg: RunConfig) -> DetectionData:
        fmnist = find_data_dir(cfg.data_dir, cfg.download)
        n_train, n_val = QUICK_SET if cfg.quick else (TRAIN_DEFAULTS.n_train, TRAIN_DEFAULTS.n_val)
        root = cache_dir() / "data" / f"fmnist-detection-{n_train}-{n_val}"
        paths = make_detection_set(root, fmnist_dir=fmnist, n_train=n_train, n_val=n_val)
        return DetectionData(load_detection_split(paths, "train"), load_detection_split(paths, "val"))

    def build_model(self, cfg: RunConfig) -> nn.Module:
        model = create_model(cfg.model, seed=cfg.seed)
        if not all(callable(getattr(model, m, None)) for m in ("dense", "anchors", "compute_loss")):
            raise ValueError(f"{cfg.model!r} is not a detector of this task (a RetinaNet with the dense(images) and "
                             "anchors(batch) of hawq.models.retinanet_tiny.TinyRetinaNet): use retinanet_tiny")
        return model

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




def fixed_layers(model: TinyRetinaNet, bits: int = 8) -> dict[str, int]:
    """The first conv and both output convs stay at `bits` (the paper's first/last-layer rule)."""
    return {"backbone.convs.0": bits, "head.classification_head.cls_logits": bits,
            "head.regression_head.bbox_reg": bits}


def pack_targets(targets: list[Target]) -> Tensor:
    """Targets as one tensor (B, M, 5) of x1, y1, x2, y2, label; rows past an image's boxes have label -1."""
    m = max((len(t["boxes"]) for t in targets), default=0)
    y = torch.full((len(targets), max(m, 1), 5), -1.0)
    for i, t in enumerate(targets):
        n = len(t["boxes"])
        y[i, :n, :4] = t["boxes"]
        y[i, :n, 4] = t["labels"].to(y.dtype)
    return y


def unpack_targets(y: Tensor) -> list[Target]:
    keep = y[..., 4] >= 0
    return [{"boxes": yi[k, :4], "labels": yi[k, 4].long()} for yi, k in zip(y, keep)]


def dense_loss(model: TinyRetinaNet, out: Tensor, targets: list[Target] | Tensor) -> Tensor:
    """RetinaNet's loss (focal classification + L1 box regression, each per foreground anchor, batch mean)
    of dense outputs `out` (B, HWA, K + 4)."""
    if isinstance(targets, Tensor):
        targets = unpack_targets(targets)
    k = model.head.classification_head.num_classes
    head_out = {"cls_logits": out[..., :k], "bbox_regression": out[..., k:]}
    targets = [{"boxes": t["boxes"].to(out), "labels": t["labels"].to(out.device)} for t in targets]
    losses = model.compute_loss(targets, head_out, model.anchors(out.shape[0]))
    return losses["classification"] + losses["bbox_regression"]


def detection_loss(model: TinyRetinaNet, images: Tensor, targets: list[Target] | Tensor) -> Tensor:
    """The scalar loss of a batch, in whatever mode the model is (eval mode: batch norm uses its statistics)."""
    return dense_loss(model, model(images), targets)


def detection_loss_fn(model: TinyRetinaNet) -> Callable[[Tensor, Tensor], Tensor]:
    """`loss(output, packed_targets)` for `hawq.hessian.estimate_traces(..., loss=...)`."""
    return lambda out, y: dense_loss(model, out, y)


def hessian_batches(loader: Iterable[tuple[Tensor, list[Target]]]) -> Iterator[tuple[Tensor, Tensor]]:
    """(images, packed targets) batches, the (inputs, labels) form `estimate_traces` slices into chunks."""
    for images, targets in loader:
        yield images, pack_targets(targets)


def _one_cycle(step: int, steps: int, warmup: float) -> float:
    n_warm = max(1, round(warmup * steps))
    if step < n_warm:
        return (step + 1) / n_warm
    return 0.5 * (1 + math.cos(math.pi * (step - n_warm) / max(1, steps - n_warm)))


def train_detector(
    model: TinyRetinaNet,
    loader: Iterable[tuple[Tensor, list[Target]]],
    epochs: int,
    lr: float,
    seed: int = 0,
    progress: bool = True,
    weight_decay: float = 1e-4,
    warmup: float = 0.1,
) -> list[float]:
    """AdamW, learning rate warmed up linearly over `warmup` of the steps, then cosine decay to 0; gradient
    norms clipped at 10. Works for float and fake-quantized models. Returns the mean loss of each epoch."""
    if epochs < 1 or not lr > 0:
        raise ValueError("epochs must be >= 1 and lr > 0")
    steps = epochs * len(loader)  # type: ignore[arg-type]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(_one_cycle, steps=steps, warmup=warmup))
    history = []
    bar = tqdm(total=steps, desc="train detector", unit="step", disable=not progress)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        for _ in range(epochs):
            total, n = 0.0, 0
            dev = next(model.parameters()).device
            for images, targets in loader:
                images = [im.to(dev) for im in images]
                targets = [{k: v.to(dev) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets]
                losses = model(images, targets)
                loss = losses["classification"] + losses["bbox_regression"]
                if not torch.isfinite(loss):
                    raise ValueError(f"the loss became {float(loss)}: lower the learning rate (now {lr})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(params, 10.0)
                opt.step()
                sched.step()
                total, n = total + loss.item(), n + 1
                bar.update()
                bar.set_postfix(loss=f"{total / n:.3f}")
            history.append(total / max(n, 1))
    bar.close()
    model.eval()
    return history


def evaluate_map(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, list[Target]]],
    coco_gt_json: str | os.PathLike | Any | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """COCO box AP of `model` over `loader`: {"map": AP@[.50:.95], "map50": AP@.50, "n_images"}.

    `coco_gt_json` (path or pycocotools COCO) defaults to the loader's dataset's annotation file; labels
    map to category ids in sorted order (1..K), as `hawq.data.coco` assigns them.
    """
    dataset = getattr(loader, "dataset", None)
    if coco_gt_json is None:
        coco_gt_json = getattr(dataset, "coco", None)
        if coco_gt_json is None:
            raise ValueError("pass coco_gt_json: the loader's dataset holds no COCO annotations")
    coco_gt = load_coco(coco_gt_json) if isinstance(coco_gt_json, (str, os.PathLike)) else coco_gt_json
    label_to_cat = {i + 1: c for i, c in enumerate(sorted(coco_gt.getCatIds()))}
    params = model.parameters() if isinstance(model, nn.Module) else iter(())
    device = next(params, torch.empty(0)).device
    return coco_map(model, loader, coco_gt, label_to_cat=label_to_cat, device=str(device), progress=progress)
