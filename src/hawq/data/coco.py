"""COCO-format detection data through pycocotools: an annotation json plus a folder of images.

`CocoDetection` yields `(image, target)` in the form torchvision's detection models take: `image` a float
tensor (C, H, W) in [0, 1], `target` a dict with `boxes` (N, 4) as x1, y1, x2, y2 in pixels, `labels` (N,)
int64 and `image_id`. Crowd annotations and boxes of zero width or height are left out of the targets
(as torchvision's reference scripts do); COCOeval still sees them through the ground-truth file.

Labels are contiguous by default, 1..K in the order of the sorted category ids, with 0 left for the
background of models that need one; a model therefore takes `num_classes = K + 1`. With
`label_map="category_id"` the labels are the category ids themselves (what torchvision's COCO weights
were trained on: `num_classes = 91` for COCO). `label_to_cat` maps labels back for COCOeval.
`coco_map` runs a model over a loader and returns COCO's box AP (IoU .50:.95) and AP50.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

Target = dict[str, Tensor]


def _require_pycocotools() -> Any:
    try:
        from pycocotools.coco import COCO
    except ImportError as e:  # optional dependency
        raise ValueError("COCO data needs pycocotools: pip install 'hawq[detection]'") from e
    return COCO


def load_coco(ann_file: str | os.PathLike) -> Any:
    """pycocotools COCO object for `ann_file`, without its progress prints."""
    COCO = _require_pycocotools()
    path = Path(ann_file)
    if not path.is_file():
        raise ValueError(f"COCO annotation file {path} does not exist: pass the instances_*.json path")
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


class CocoDetection(Dataset):
    """Images of `images_dir` with boxes from the COCO annotation file `ann_file`.

    `image_ids` restricts (and orders) the images; by default all images of the file, sorted by id.
    `label_map` is "contiguous" (labels 1..K) or "category_id" (labels = COCO category ids).
    `mode` is the PIL mode the images are converted to ("RGB" for the torchvision detectors, "L" for one
    channel). `transforms(image, target) -> (image, target)` runs after the conversion to tensors.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        *,
        image_ids: Sequence[int] | None = None,
        mode: str = "RGB",
        transforms: Callable[[Tensor, Target], tuple[Tensor, Target]] | None = None,
        label_map: str = "contiguous",
    ) -> None:
        self.images_dir = Path(images_dir)
        if not self.images_dir.is_dir():
            raise ValueError(f"COCO image folder {self.images_dir} does not exist: pass the folder of images")
        self.coco = load_coco(ann_file)
        self.cat_ids: list[int] = sorted(self.coco.getCatIds())
        if label_map == "contiguous":
            self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        elif label_map == "category_id":
            self.cat_to_label = {c: c for c in self.cat_ids}
        else:
            raise ValueError(f"label_map {label_map!r} is unknown: use 'contiguous' or 'category_id'")
        self.label_to_cat = {v: k for k, v in self.cat_to_label.items()}
        all_ids = sorted(self.coco.getImgIds())
        if image_ids is None:
            self.image_ids = all_ids
        else:
            unknown = set(image_ids) - set(all_ids)
            if unknown:
                raise ValueError(f"image ids {sorted(unknown)[:5]} are not in {ann_file}: pass ids from it")
            self.image_ids = list(image_ids)
        self.mode = mode
        self.transforms = transforms

    @property
    def num_classes(self) -> int:
        """Largest label + 1 (label 0 = background): the `num_classes` a torchvision detector takes."""
        return max(self.label_to_cat, default=0) + 1

    @property
    def class_names(self) -> list[str]:
        return [self.coco.cats[c]["name"] for c in self.cat_ids]

    def __len__(self) -> int:
        return len(self.image_ids)

    def target(self, image_id: int) -> Target:
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id]))
        boxes, labels = [], []
        for a in anns:
            x, y, w, h = a["bbox"]
            if a.get("iscrowd", 0) or w <= 0 or h <= 0:
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(self.cat_to_label[a["category_id"]])
        return {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
        }

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = self.images_dir / info["file_name"]
        if not path.is_file():
            raise ValueError(f"image {path} named in the annotation file is missing from {self.images_dir}")
        with Image.open(path) as im:
            image = pil_to_tensor(im.convert(self.mode)).float().div_(255)  # (C, H, W)
        target = self.target(image_id)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def detection_collate(batch: Sequence[tuple[Tensor, Target]]) -> tuple[list[Tensor], list[Target]]:
    """Keep images of different sizes as a list, as torchvision's detection models take them."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def coco_loader(
    dataset: CocoDetection,
    batch_size: int = 2,
    *,
    shuffle: bool = False,
    workers: int = 0,
    seed: int = 0,
) -> DataLoader:
    """DataLoader with `detection_collate`; shuffling draws from a generator seeded by `seed`."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
        collate_fn=detection_collate, generator=g,
    )


def detections_to_coco(
    outputs: Iterable[Mapping[str, Tensor]], image_ids: Iterable[int], label_to_cat: Mapping[int, int]
) -> list[dict[str, Any]]:
    """torchvision detector outputs (boxes xyxy, scores, labels) as COCO result records (bbox xywh)."""
    records = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().cpu().double()
        scores = out["scores"].detach().cpu().tolist()
        labels = out["labels"].detach().cpu().tolist()
        for (x1, y1, x2, y2), s, lab in zip(boxes.tolist(), scores, labels):
            if lab not in label_to_cat:
                continue  # e.g. the background label of a model with spare classes
            records.append({
                "image_id": int(image_id), "category_id": int(label_to_cat[lab]),
                "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s),
            })
    return records


def coco_eval(coco_gt: Any, records: list[dict[str, Any]], image_ids: Sequence[int]) -> dict[str, float]:
    """COCOeval box AP over `image_ids`: {"map": AP@[.50:.95], "map50": AP@.50}; no detections gives 0."""
    from pycocotools.cocoeval import COCOeval

    if not records:
        return {"map": 0.0, "map50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(records)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = sorted(set(int(i) for i in image_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # COCOeval reports -1 where no ground truth exists; that is no evidence of detection quality
    return {"map": max(float(ev.stats[0]), 0.0), "map50": max(float(ev.stats[1]), 0.0)}


@torch.no_grad()
def coco_map(
    model: nn.Module,
    loader: Iterable[tuple[Sequence[Tensor], Sequence[Target]]],
    coco_gt: Any | None = None,
    *,
    label_to_cat: Mapping[int, int] | None = None,
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Run a torchvision-style detector (eval mode) over `loader` and score it with COCOeval.

    `coco_gt` and `label_to_cat` default to those of `loader.dataset` (a `CocoDetection`).
    Returns {"map": AP@[.50:.95], "map50": AP@.50, "n_images": images scored}.
    """
    dataset = getattr(loader, "dataset", None)
    coco_gt = coco_gt if coco_gt is not None else getattr(dataset, "coco", None)
    label_to_cat = label_to_cat if label_to_cat is not None else getattr(dataset, "label_to_cat", None)
    if coco_gt is None or label_to_cat is None:
        raise ValueError("pass coco_gt and label_to_cat: the loader's dataset is not a CocoDetection")
    was_training = model.training
    model.eval()
    records: list[dict[str, Any]] = []
    seen: list[int] = []
    batches = loader
    if progress:
        from tqdm import tqdm

        batches = tqdm(loader, desc="mAP", leave=False)
    try:
        for i, (images, targets) in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            outputs = model([im.to(device) for im in images])
            ids = [int(t["image_id"]) for t in targets]
            records += detections_to_coco(outputs, ids, label_to_cat)
            seen += ids
    finally:
        model.train(was_training)
    return {**coco_eval(coco_gt, records, seen), "n_images": float(len(seen))}


def write_synthetic_coco(
    root: str | os.PathLike, n_images: int = 4, image_size: int = 64, n_classes: int = 2, seed: int = 0
) -> tuple[Path, Path]:
    """A tiny COCO set for tests: one to three filled rectangles per image, the class sets the colour.

    Writes root/images/*.png and root/annotations.json; returns (images_dir, ann_file).
    """
    from PIL import Image

    root = Path(root)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    colours = [(255, 40, 40), (40, 255, 40), (40, 40, 255), (255, 255, 40)]
    images, anns = [], []
    for i in range(n_images):
        canvas = torch.zeros(image_size, image_size, 3, dtype=torch.uint8)
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            c = int(torch.randint(n_classes, (1,), generator=g))
            w, h = (int(v) for v in torch.randint(image_size // 6, image_size // 2, (2,), generator=g))
            x = int(torch.randint(0, image_size - w, (1,), generator=g))
            y = int(torch.randint(0, image_size - h, (1,), generator=g))
            canvas[y : y + h, x : x + w] = torch.tensor(colours[c % len(colours)], dtype=torch.uint8)
            anns.append({
                "id": len(anns) + 1, "image_id": i + 1, "category_id": c + 1,
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
            })
        name = f"{i + 1:06d}.png"
        Image.fromarray(canvas.numpy()).save(images_dir / name)
        images.append({"id": i + 1, "file_name": name, "width": image_size, "height": image_size})
    cats = [{"id": c + 1, "name": f"class{c}"} for c in range(n_classes)]
    ann_file = root / "annotations.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return images_dir, ann_file
