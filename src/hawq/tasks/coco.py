"""The paper's detector on COCO behind the pipeline's stages: torchvision's RetinaNet (ResNet-50-FPN) on an
annotation file plus image folder, scored by COCO mAP. Images are resized to a fixed square `--image-size`
(boxes scaled with them), so that the dense head output has one shape and the Hessian traces can run on it.

Layouts of --data-dir: COCO's own (annotations/instances_{train,val}2017.json with train2017/, val2017/) or
hawq's (train.json, val.json with train/, val/).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.image_list import ImageList

from hawq.config import RunConfig
from hawq.data.coco import CocoDetection
from hawq.models import create_model
from hawq.tasks.detection import DetectionTask

DEFAULT_SIZE = 512


class DenseRetinaNet(RetinaNet):
    """A torchvision RetinaNet that, given a stacked (B, C, S, S) tensor, returns the dense head output
    (B, A, K + 4) as `hawq.models.retinanet_tiny.TinyRetinaNet` does: the form traces, calibration and BOPs use."""

    def forward(self, images, targets=None):
        if isinstance(images, Tensor) and images.dim() == 4 and targets is None:
            return self.dense(images)
        return super().forward(images, targets)

    def dense(self, images: Tensor) -> Tensor:
        mean = images.new_tensor(self.transform.image_mean).view(1, -1, 1, 1)
        std = images.new_tensor(self.transform.image_std).view(1, -1, 1, 1)
        feats = list(self.backbone((images - mean) / std).values())
        self._shapes = (tuple(images.shape[1:]), [tuple(f.shape[-2:]) for f in feats])
        out = self.head(feats)
        return torch.cat([out["cls_logits"], out["bbox_regression"]], dim=2)

    def anchors(self, batch: int) -> list[Tensor]:
        (c, h, w), sizes = self._shapes
        ref = next(self.parameters())
        images = ImageList(ref.new_zeros(batch, c, h, w), [(h, w)] * batch)
        return self.anchor_generator(images, [ref.new_zeros(batch, 1, *s) for s in sizes])


def as_dense(model: nn.Module) -> nn.Module:
    if not isinstance(model, RetinaNet):
        raise ValueError(f"the COCO task takes a RetinaNet, got {type(model).__name__}: use retinanet_resnet50_fpn")
    model.__class__ = DenseRetinaNet  # same state; adds the dense forward
    return model


class _Resize:
    """Resize an image to size x size (bilinear) and scale its boxes."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        h, w = image.shape[-2:]
        image = F.interpolate(image[None], size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
        scale = torch.tensor([self.size / w, self.size / h, self.size / w, self.size / h])
        return image, {**target, "boxes": target["boxes"] * scale}


class _Cached(torch.utils.data.Dataset):
    """A COCO split decoded once into memory (images of one size stacked)."""

    def __init__(self, ds: CocoDetection) -> None:
        items = [ds[i] for i in range(len(ds))]
        self.images = torch.stack([im for im, _ in items])
        self.targets = [t for _, t in items]
        self.coco, self.label_to_cat, self.num_classes = ds.coco, ds.label_to_cat, ds.num_classes

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.images[i], self.targets[i]


@dataclass
class CocoData:
    train: _Cached
    val: _Cached


def _split(root: Path, split: str) -> tuple[Path, Path]:
    for ann, images in ((root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017"),
                        (root / f"{split}.json", root / split)):
        if ann.exists() and images.is_dir():
            return images, ann
    raise ValueError(f"no {split} annotations in {root}: expected annotations/instances_{split}2017.json with "
                     f"{split}2017/, or {split}.json with {split}/")


class CocoTask(DetectionTask):
    def _size(self, cfg: RunConfig) -> int:
        return cfg.image_size or DEFAULT_SIZE

    def load_data(self, cfg: RunConfig) -> CocoData:
        if cfg.data_dir is None:
            raise ValueError("the coco data set needs --data-dir (annotation json files and image folders)")
        root, size = Path(cfg.data_dir), self._size(cfg)
        splits = []
        for split in ("train", "val"):
            images, ann = _split(root, split)
            splits.append(_Cached(CocoDetection(images, ann, transforms=_Resize(size))))
        return CocoData(*splits)

    def build_model(self, cfg: RunConfig) -> nn.Module:
        size = self._size(cfg)
        num_classes = cfg.num_classes or 1 + len(CocoDetection(*_split(Path(cfg.data_dir), "val")).cat_ids)
        torch.manual_seed(cfg.seed)
        kw = {} if cfg.weights is None else {"weights": cfg.weights}
        return as_dense(create_model(cfg.model, num_classes=num_classes, min_size=size, max_size=size, **kw))

    def fixed_layers(self, model: nn.Module, bits: int = 8) -> dict[str, int]:
        return {"backbone.body.conv1": bits, "head.classification_head.cls_logits": bits,
                "head.regression_head.bbox_reg": bits}

    def full_precision_model(self, cfg: RunConfig, data: CocoData, progress: bool) -> tuple[nn.Module, dict]:
        if cfg.weights is not None and cfg.checkpoint is None:
            return self.build_model(cfg).to(cfg.device).eval(), {"source": f"weights {cfg.weights}"}
        return super().full_precision_model(cfg, data, progress)
