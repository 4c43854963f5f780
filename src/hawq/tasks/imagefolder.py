"""Classification on an ImageFolder tree (ImageNet: root/train/<class>/*, root/val/<class>/*) behind the
pipeline's stages, for the paper's ResNet-50, Inception-V3 and SqueezeNext (and any registered model)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hawq.config import RunConfig
from hawq.data.imagenet import INCEPTION_IMAGE_SIZE, _subset, imagenet_folder
from hawq.models import create_model
from hawq.quant import decompose_attention_
from hawq.tasks.classification import ClassificationTask, full_precision_model
from hawq.train import evaluate

QUICK_IMAGES = (256, 128)  # train, val images of a --quick run


@dataclass
class ImageFolderData:
    train: Dataset  # training transform (random crops and flips)
    trace: Dataset  # the training images with the evaluation transform: traces and calibration
    test: Dataset
    num_classes: int


def image_size(cfg: RunConfig) -> int:
    if cfg.image_size:
        return cfg.image_size
    return INCEPTION_IMAGE_SIZE if cfg.model in ("inception_v3", "torchvision:inception_v3") else 224


def _root(cfg: RunConfig) -> Path:
    if cfg.data_dir is None:
        raise ValueError(f"the {cfg.dataset} data set needs --data-dir ROOT holding train/ and val/ class folders")
    return Path(cfg.data_dir)


def count_classes(cfg: RunConfig) -> int:
    folder = _root(cfg) / "train"
    if not folder.is_dir():
        raise ValueError(f"{folder} does not exist: --data-dir must hold train/ and val/, one folder per class")
    return cfg.num_classes or sum(1 for p in folder.iterdir() if p.is_dir())


class ImageFolderTask(ClassificationTask):
    def load_data(self, cfg: RunConfig) -> ImageFolderData:
        root, size = _root(cfg), image_size(cfg)
        n_train, n_val = QUICK_IMAGES if cfg.quick else (None, None)
        train = imagenet_folder(root, "train", size)
        trace = imagenet_folder(root, "train", size, train=False)
        val = imagenet_folder(root, "val", size)
        if len(train) == 0 or len(val) == 0:
            raise ValueError(f"no images under {root}/train or {root}/val: check --data-dir")
        return ImageFolderData(_subset(train, n_train, cfg.seed), _subset(trace, n_train, cfg.seed),
                               _subset(val, n_val, cfg.seed + 1), count_classes(cfg))

    def build_model(self, cfg: RunConfig) -> nn.Module:
        torch.manual_seed(cfg.seed)
        kw = {} if cfg.weights is None else {"weights": cfg.weights}
        model = create_model(cfg.model, in_channels=3, num_classes=count_classes(cfg), **kw)
        decompose_attention_(model)  # attention projections become quantizable Linear layers
        return model

    def full_precision_model(self, cfg: RunConfig, data: ImageFolderData, progress: bool) -> tuple[nn.Module, dict]:
        return full_precision_model(cfg, data, progress, build=self.build_model)

    def evaluate(self, model: nn.Module, data: ImageFolderData, progress: bool) -> dict[str, float]:
        return {"top1": evaluate(model, data.test, batch_size=64, progress=progress)}

    def example_input(self, data: ImageFolderData) -> torch.Tensor:
        return data.trace[0][0].unsqueeze(0)

    def trace_batches(self, cfg: RunConfig, data: ImageFolderData):
        g = torch.Generator().manual_seed(cfg.seed + 1)
        return DataLoader(data.trace, batch_size=cfg.trace_batch_size, shuffle=True, generator=g, num_workers=2)

    def calibration_batches(self, data: ImageFolderData):
        return DataLoader(data.trace, batch_size=32, num_workers=2)

    def export_batches(self, data: ImageFolderData):
        return DataLoader(data.test, batch_size=64, num_workers=2)
