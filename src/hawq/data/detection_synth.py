"""A small COCO-format detection set built from Fashion-MNIST items placed on larger canvases.

Each image is a `canvas` x `canvas` grey canvas holding 1..4 items (the 10 Fashion-MNIST classes), each
rescaled by a factor drawn from `scale` (relative to the 28 px item) and placed so that no two boxes
touch. A box is the tight box of the item's nonzero pixels (pixels under `INK_THRESHOLD` are cleared
first, so the box is exactly the extent of what is drawn). Train images use items of the Fashion-MNIST
train split, val images items of the test split. The same seed gives the same bytes.

Layout of `out_dir` (true COCO: PNG files plus an annotation file per split):
    train/000000.png ...   train.json     val/000000.png ...   val.json
The set is written into a temporary sibling folder and renamed at the end, so a killed run leaves no
half-written set; a folder that already holds a set built with the same parameters is reused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from hawq.artifacts import current_umask, dumps
from hawq.data.coco import CocoDetection
from hawq.data.fashion_mnist import CLASSES, FILES, find_data_dir, read_idx

INK_THRESHOLD = 16  # grey levels below this count as background (Fashion-MNIST has faint stray pixels)
_MAX_TRIES = 50  # placement attempts per item before it is left out


def _load_items(fmnist_dir: str | os.PathLike | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    folder = find_data_dir(fmnist_dir)
    img_file, lbl_file = FILES[split]
    return read_idx(folder / img_file), read_idx(folder / lbl_file)


@dataclass(frozen=True)
class DetectionSetSpec:
    """The parameters that define a generated set (stored in each annotation file's `info`)."""

    n_train: int = 2000
    n_val: int = 500
    canvas: int = 96
    min_objects: int = 1
    max_objects: int = 4
    min_scale: float = 0.6
    max_scale: float = 1.6
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_train < 1 or self.n_val < 1:
            raise ValueError("n_train and n_val must be at least 1")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError("objects must be a range (lo, hi) with 1 <= lo <= hi")
        if not 0 < self.min_scale <= self.max_scale or 28 * self.max_scale > self.canvas:
            raise ValueError(f"scale must satisfy 0 < lo <= hi and 28*hi <= canvas ({self.canvas})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectionSetSpec:
        return cls(**d)


@dataclass(frozen=True)
class DetectionSetPaths:
    root: Path
    train_images: Path
    train_json: Path
    val_images: Path
    val_json: Path

    @classmethod
    def at(cls, root: Path) -> DetectionSetPaths:
        return cls(root, root / "train", root / "train.json", root / "val", root / "val.json")

    def to_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}


def _item_patch(item: np.ndarray, size: int) -> np.ndarray:
    """Resize a 28x28 item to size x size, clear faint pixels and crop to the tight box of the rest."""
    x = torch.from_numpy(item.astype(np.float32))[None, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < 28)
    patch = x[0, 0].round().clamp(0, 255).numpy().astype(np.uint8)
    patch[patch < INK_THRESHOLD] = 0
    rows, cols = np.nonzero(patch.any(axis=1))[0], np.nonzero(patch.any(axis=0))[0]
    if rows.size == 0:
        return patch[:0, :0]
    return patch[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _separated(box: tuple[int, int, int, int], boxes: list[tuple[int, int, int, int]]) -> bool:
    """True if `box` (x, y, w, h) keeps at least one empty pixel between itself and every box."""
    x, y, w, h = box
    return all(x >= bx + bw + 1 or bx >= x + w + 1 or y >= by + bh + 1 or by >= y + h + 1 for bx, by, bw, bh in boxes)


def _make_split(
    items: np.ndarray, labels: np.ndarray, n: int, spec: DetectionSetSpec, rng: np.random.Generator, img_dir: Path
) -> dict[str, Any]:
    images, annotations = [], []
    for image_id in range(1, n + 1):
        canvas = np.zeros((spec.canvas, spec.canvas), dtype=np.uint8)
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(int(rng.integers(spec.min_objects, spec.max_objects + 1))):
            k = int(rng.integers(len(items)))
            size = int(round(28 * rng.uniform(spec.min_scale, spec.max_scale)))
            patch = _item_patch(items[k], size)
            h, w = patch.shape
            if h == 0:
                continue
            for _ in range(_MAX_TRIES):
                x, y = int(rng.integers(spec.canvas - w + 1)), int(rng.integers(spec.canvas - h + 1))
                if _separated((x, y, w, h), boxes):
                    break
            else:
                continue
            boxes.append((x, y, w, h))
            canvas[y : y + h, x : x + w] = patch
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(labels[k]) + 1,
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
            })
        name = f"{image_id - 1:06d}.png"
        Image.fromarray(canvas, mode="L").save(img_dir / name, format="PNG")
        images.append({"id": image_id, "file_name": name, "width": spec.canvas, "height": spec.canvas})
    return {"images": images, "annotations": annotations}


def make_detection_set(
    out_dir: str | os.PathLike,
    fmnist_dir: str | os.PathLike | None = None,
    n_train: int = 2000,
    n_val: int = 500,
    canvas: int = 96,
    objects: tuple[int, int] = (1, 4),
    scale: tuple[float, float] = (0.6, 1.6),
    seed: int = 0,
) -> DetectionSetPaths:
    """Generate (or reuse) the Fashion-MNIST detection set in `out_dir`; returns its paths."""
    spec = DetectionSetSpec(n_train, n_val, canvas, objects[0], objects[1], float(scale[0]), float(scale[1]), seed)
    root = Path(out_dir)
    paths = DetectionSetPaths.at(root)
    if root.exists():
        try:
            found = json.loads(paths.val_json.read_text())["info"]["spec"]
        except (OSError, ValueError, KeyError, TypeError):
            found = None
        if found == spec.to_dict():
            return paths
        raise ValueError(f"{root} exists but does not hold a detection set built with {spec}: delete it or "
                         "choose another folder")
    rng = np.random.default_rng(seed)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        categories = [{"id": i + 1, "name": c, "supercategory": "fashion"} for i, c in enumerate(CLASSES)]
        for split, n in (("train", spec.n_train), ("val", spec.n_val)):
            items, labels = _load_items(fmnist_dir, "train" if split == "train" else "test")
            (tmp / split).mkdir()
            coco = _make_split(items, labels, n, spec, rng, tmp / split)
            coco["categories"] = categories
            coco["info"] = {"description": f"Fashion-MNIST detection set ({split})", "spec": spec.to_dict()}
            (tmp / f"{split}.json").write_text(dumps(coco))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700: give it a plain mkdir's mode
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return paths


def make_tiny_detection_set(
    out_dir: str | os.PathLike, fmnist_dir: str | os.PathLike | None = None, seed: int = 0
) -> DetectionSetPaths:
    """A few images for tests (6 train, 4 val, 64 px canvas)."""
    return make_detection_set(out_dir, fmnist_dir, n_train=6, n_val=4, canvas=64, scale=(0.6, 1.4), seed=seed)



class CachedDetection(Dataset):
    """A split of the set held in memory: `ds[i] -> (image (1, H, W) in [0, 1], target)`.

    Targets are those of `hawq.data.coco.CocoDetection` (boxes xyxy in pixels, labels 1..10, image_id);
    `ann_file`, `coco` and `label_to_cat` are kept for scoring. Decoding the PNGs once, not every epoch,
    keeps the training loop busy with the model.
    """

    def __init__(self, images_dir: str | os.PathLike, ann_file: str | os.PathLike) -> None:
        src = CocoDetection(images_dir, ann_file, mode="L")
        self.ann_file = Path(ann_file)
        self.coco, self.label_to_cat, self.num_classes = src.coco, src.label_to_cat, src.num_classes
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny per-image ops: extra threads only wait on each other on a busy machine
        try:
            items = [src[i] for i in range(len(src))]
        finally:
            torch.set_num_threads(threads)
        self.images = torch.stack([im for im, _ in items])  # (N, 1, H, W)
        self.targets = [t for _, t in items]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, idx: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.images[idx], self.targets[idx]


def load_detection_split(paths: DetectionSetPaths, split: str) -> CachedDetection:
    """The "train" or "val" split of a generated set, decoded into memory."""
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}: use 'train' or 'val'")
    return CachedDetection(getattr(paths, f"{split}_images"), getattr(paths, f"{split}_json"))


def stack_collate(batch: list[tuple[Tensor, dict[str, Tensor]]]) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """Images of one size stacked to (B, 1, H, W); targets kept as a list (torchvision's form)."""
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


class _FlipCollate:
    """`stack_collate`, then each image and its boxes mirrored left-right with probability 1/2."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, batch: list[tuple[Tensor, dict[str, Tensor]]]) -> tuple[Tensor, list[dict[str, Tensor]]]:
        images, targets = stack_collate(batch)
        flip = torch.rand(len(targets), generator=self.gen) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        width = images.shape[-1]
        out = []
        for t, f in zip(targets, flip.tolist()):
            if f:
                b = t["boxes"]
                t = {**t, "boxes": torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1)}
            out.append(t)
        return images, out


def detection_loader(
    dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0, flip: bool = False
) -> DataLoader:
    """Batches (images (B, 1, H, W), targets). With `shuffle` the order, with `flip` the random left-right
    mirroring (Fashion-MNIST items are near-symmetric), come from `seed` alone."""
    gen = torch.Generator().manual_seed(seed)
    collate = _FlipCollate(seed + 1) if flip else stack_collate
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, collate_fn=collate,
                      num_workers=0)
