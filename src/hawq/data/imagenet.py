"""ImageNet (ILSVRC-2012) as an ImageFolder tree: root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG.

Standard transforms: training takes a RandomResizedCrop of `image_size` and a horizontal flip; evaluation
resizes the short side to image_size * 256/224 and takes the central `image_size` crop (224 -> 256/224,
299 -> 342/299 for Inception-V3). Both normalise with the ImageNet channel mean and std.
Nothing is downloaded: the tree must exist locally (e.g. from the ILSVRC-2012 tarballs with the usual
valprep script that sorts the validation images into class folders).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_IMAGE_SIZE = 299


def train_transform(image_size: int = 224):
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(image_size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(image_size: int = 224):
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(round(image_size * 256 / 224)),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def imagenet_folder(root: str | os.PathLike, split: str, image_size: int = 224, train: bool | None = None):
    """torchvision ImageFolder over root/split with the standard transform (training if split == "train")."""
    from torchvision.datasets import ImageFolder

    path = Path(root) / split
    if not path.is_dir():
        raise ValueError(
            f"ImageNet folder {path} does not exist: pass --data-root pointing at a folder with train/ and "
            "val/, each holding one sub-folder of images per class"
        )
    train = split == "train" if train is None else train
    tf = train_transform(image_size) if train else eval_transform(image_size)
    return ImageFolder(str(path), transform=tf)


def _subset(ds, max_images: int | None, seed: int):
    if max_images is None or max_images >= len(ds):
        return ds
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:max_images].sort().values.tolist()
    return Subset(ds, idx)


def imagenet_loaders(
    root: str | os.PathLike,
    image_size: int = 224,
    batch_size: int = 64,
    workers: int = 4,
    seed: int = 0,
    *,
    max_train_images: int | None = None,
    max_val_images: int | None = None,
    distributed: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """(train_loader, val_loader) over root/train and root/val.

    The training loader shuffles with a generator seeded by `seed` (the random crops use torch's global
    generator in the workers, which DataLoader seeds from the same base seed). `max_*_images` take a
    seeded random subset, for quick runs. With `distributed`, both loaders shard their images across the
    torch.distributed ranks (DistributedSampler; call `loader.sampler.set_epoch(e)` every epoch).
    """
    if image_size < 32:
        raise ValueError(f"image_size {image_size} is too small: use 224 (299 for Inception-V3)")
    train_ds = _subset(imagenet_folder(root, "train", image_size), max_train_images, seed)
    val_ds = _subset(imagenet_folder(root, "val", image_size), max_val_images, seed + 1)
    g = torch.Generator().manual_seed(seed)
    drop_last = len(train_ds) >= batch_size  # a last batch of one breaks batch norm; tiny trees keep theirs
    if distributed:
        from torch.utils.data.distributed import DistributedSampler

        train_sampler = DistributedSampler(train_ds, shuffle=True, seed=seed)
        val_sampler = DistributedSampler(val_ds, shuffle=False)
        train = DataLoader(train_ds, batch_size, sampler=train_sampler, num_workers=workers,
                           generator=g, drop_last=drop_last, pin_memory=torch.cuda.is_available())
        val = DataLoader(val_ds, batch_size, sampler=val_sampler, num_workers=workers)
        return train, val
    train = DataLoader(train_ds, batch_size, shuffle=True, num_workers=workers, generator=g,
                       drop_last=drop_last, pin_memory=torch.cuda.is_available())
    val = DataLoader(val_ds, batch_size, shuffle=False, num_workers=workers)
    return train, val
