"""Write a generated ImageFolder tree shaped like ImageNet: root/{train,val}/<class>/*.png.

Every class (n00000000, n00000001, ... as ILSVRC's wnid folders) gets `--per-class` small images per
split, random but deterministic (one seed per class and split), so that the ImageNet recipes can be tried
on a machine without ImageNet:

    python bench/make_imagefolder.py /tmp/fake_imagenet            # 1000 classes, 2 images each (~30 s)
    hawq run --recipe configs/resnet50_imagenet.json --quick --device cpu --data-dir /tmp/fake_imagenet

Each class has its own mean colour and stripe orientation, so the classes are (barely) learnable; the
numbers a run reports on it mean nothing beyond "every stage ran".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def make_imagefolder(root: str | Path, n_classes: int = 1000, per_class: int = 2, size: int = 32,
                     seed: int = 0) -> Path:
    """Write root/train and root/val with `per_class` PNG images of `size` px per class; returns root."""
    from PIL import Image

    if n_classes < 1 or per_class < 1 or size < 4:
        raise ValueError("n_classes and per_class must be positive and size at least 4")
    root = Path(root)
    for split_id, split in enumerate(("train", "val")):
        for c in range(n_classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, split_id, c])
            colour = np.random.default_rng([seed, c]).integers(30, 226, size=3)
            yy, xx = np.mgrid[0:size, 0:size]
            stripes = np.sin((xx if c % 2 else yy) * (1 + c % 7) * np.pi / size)[..., None] * 40
            for i in range(per_class):
                noise = rng.normal(0, 25, size=(size, size, 3))
                img = np.clip(colour + stripes + noise, 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{split}_{c:04d}_{i}.png")
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", help="folder to write (train/ and val/ are created inside)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=2, help="images per class and split")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    root = make_imagefolder(args.root, args.classes, args.per_class, args.size, args.seed)
    print(f"wrote {root}/train and {root}/val: {args.classes} classes x {args.per_class} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
