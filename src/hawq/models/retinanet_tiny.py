"""The detection model: RetinaNet (Lin et al., "Focal Loss for Dense Object Detection", arXiv 1708.02002) with a
small backbone, trained and scored (COCO mAP) on the Fashion-MNIST detection set.

The detector is torchvision's `RetinaNet` with a five-conv backbone (one feature map at stride 8), anchors
of 12-48 px and a head trimmed to `head_convs` convolutions per branch. It takes two kinds of input:

    model(list_of_images[, targets])   torchvision's API: losses in train mode, detections in eval mode
    model(images)  # (B, C, H, W)      the dense head output (B, HWA, K + 4): per anchor, K class logits
                                       then 4 box deltas, as a classifier gives logits

The dense form is what `hawq.calibrate_`, `layer_macs`, the Hessian traces and export call; the loss on it
(`dense_loss`) is RetinaNet's own: sigmoid focal loss + box regression, both twice differentiable and
elementwise in the head output, so the traces' Gauss-Newton part comes from the loss's own output Hessian
(`hawq.hessian.output_hessian`; exact for this ReLU network) and Hutchinson probes also apply. The box
loss is smooth L1 (beta 1, i.e. quadratic for the small deltas of a trained model), not torchvision's default L1:
L1 after a ReLU network has a zero Hessian almost everywhere, so every regression-head trace would be 0 and HAWQ
would think those layers free to quantize.
Labels are 1..10 as `hawq.data.coco` gives them; class 0 is unused (torchvision's convention of a
background slot), so `num_classes = 11`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead

from hawq.models import register_model

Target = dict[str, Tensor]
IMAGE_MEAN, IMAGE_STD = 0.076, 0.216  # of the generated canvases (mostly background)


@dataclass(frozen=True)
class DetectorConfig:
    """Everything that builds the detector (stored next to its weights)."""

    num_classes: int = 11
    in_channels: int = 1
    canvas: int = 96
    width: int = 64
    head_convs: int = 2
    anchor_sizes: tuple[int, ...] = (12, 20, 32, 48)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    box_loss: str = "smooth_l1"

    def __post_init__(self) -> None:
        if self.box_loss not in ("smooth_l1", "giou", "l1"):
            raise ValueError(f"box_loss {self.box_loss!r} is unknown: use 'smooth_l1', 'giou' or 'l1'")
        if self.canvas % 32:
            raise ValueError(f"canvas {self.canvas} must be a multiple of 32 (RetinaNet pads to it)")
        if not 1 <= self.head_convs <= 4:
            raise ValueError("head_convs must be 1..4")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DetectorConfig:
        d = dict(d)
        for k in ("anchor_sizes", "aspect_ratios"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


class TinyBackbone(nn.Module):
    """Five 3x3 conv-BN-ReLU layers; (B, C, H, W) -> (B, width, H/8, W/8)."""

    stride = 8

    def __init__(self, in_channels: int = 1, width: int = 64) -> None:
        super().__init__()
        chans = [(in_channels, 16, 2), (16, 32, 2), (32, 32, 1), (32, width, 2), (width, width, 1)]
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, s, 1, bias=False) for i, o, s in chans)
        self.bns = nn.ModuleList(nn.BatchNorm2d(o) for _, o, _ in chans)
        self.out_channels = width

    def forward(self, x: Tensor) -> Tensor:
        for conv, bn in zip(self.convs, self.bns):
            x = torch.relu(bn(conv(x)))
        return x


class TinyRetinaNet(RetinaNet):
    """torchvision RetinaNet on `TinyBackbone`; a stacked image tensor gives the dense head output."""

    def __init__(self, config: DetectorConfig) -> None:
        anchors = AnchorGenerator((config.anchor_sizes,), (config.aspect_ratios,))
        head = RetinaNetHead(config.width, anchors.num_anchors_per_location()[0], config.num_classes)
        for branch in (head.classification_head, head.regression_head):
            branch.conv = branch.conv[: config.head_convs]
        head.regression_head._loss_type = config.box_loss
        super().__init__(
            TinyBackbone(config.in_channels, config.width), config.num_classes,
            min_size=config.canvas, max_size=config.canvas,
            image_mean=[IMAGE_MEAN] * config.in_channels, image_std=[IMAGE_STD] * config.in_channels,
            anchor_generator=anchors, head=head, detections_per_img=100,
        )
        self.config = config

    def forward(self, images: Any, targets: list[Target] | None = None) -> Any:
        if isinstance(images, Tensor) and images.dim() == 4 and targets is None:
            return self.dense(images)
        return super().forward(images, targets)

    def dense(self, images: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1] -> (B, HWA, K + 4): class logits and box deltas of every anchor."""
        c = self.config
        if tuple(images.shape[-2:]) != (c.canvas, c.canvas):
            raise ValueError(f"images are {tuple(images.shape[-2:])}, the detector takes {c.canvas}x{c.canvas}")
        mean = images.new_tensor(self.transform.image_mean).view(1, -1, 1, 1)
        std = images.new_tensor(self.transform.image_std).view(1, -1, 1, 1)
        out = self.head([self.backbone((images - mean) / std)])
        return torch.cat([out["cls_logits"], out["bbox_regression"]], dim=2)

    def anchors(self, batch: int) -> list[Tensor]:
        """Anchors (HWA, 4) xyxy of each of `batch` canvases, in the order of `dense`'s rows."""
        c, s = self.config, self.backbone.stride
        ref = next(self.parameters())
        images = ImageList(ref.new_zeros(batch, c.in_channels, c.canvas, c.canvas), [(c.canvas, c.canvas)] * batch)
        return self.anchor_generator(images, [ref.new_zeros(batch, 1, c.canvas // s, c.canvas // s)])


def create_detector(config: DetectorConfig | None = None, seed: int = 0, **overrides: Any) -> TinyRetinaNet:
    """A freshly initialized detector; the same seed gives the same weights. `overrides` edit the config."""
    config = DetectorConfig(**{**(config or DetectorConfig()).to_dict(), **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyRetinaNet(config)


@register_model
def retinanet_tiny(seed: int = 0, **overrides: Any) -> TinyRetinaNet:
    """The detection task's default detector (`create_detector`)."""
    return create_detector(seed=seed, **overrides)
