"""Detection task: RetinaNet (Lin et al., "Focal Loss for Dense Object Detection", arXiv 1708.02002) with a
small backbone, trained and scored (COCO mAP) on the Fashion-MNIST detection set.

The detector is torchvision's `RetinaNet` with a five-conv backbone (one feature map at stride 8), anchors
of 12-48 px and a head trimmed to `head_convs` convolutions per branch. It takes two kinds of input:

    model(list_of_images[, targets])   torchvision's API: losses in train mode, detections in eval mode
    model(images)  # (B, C, H, W)      the dense head output (B, HWA, K + 4): per anchor, K class logits
                                       then 4 box deltas, as a classifier gives logits

The dense form is what `hawq.calibrate_`, `layer_macs`, the Hessian traces and export call; the loss on it
(`dense_loss`) is RetinaNet's own: sigmoid focal loss + box regression, both twice differentiable, so
Hutchinson probes with true Hessian-vector products apply (the Gauss-Newton identity of DESIGN.md holds for
cross-entropy only). The box loss is smooth L1 (beta 1, i.e. quadratic for the small deltas of a trained
model), not torchvision's default L1: L1 after a ReLU network has a zero Hessian almost everywhere, so
every regression-head trace would be 0 and HAWQ would think those layers free to quantize.
Labels are 1..10 as `hawq.data.coco` gives them; class 0 is unused (torchvision's convention of a
background slot), so `num_classes = 11`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from tqdm.auto import tqdm

from hawq.data.coco import coco_map, load_coco

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

