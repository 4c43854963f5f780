"""Fashion-MNIST from gzipped IDX files: `--data-dir`, else the Debian package's folder, else (only with
`--download`) torchvision's downloader. Everything is held in memory as tensors (60k x 28 x 28 is 47 MB)."""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MEAN, STD = 0.2860, 0.3530
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a (gzipped) IDX file into a numpy array; a damaged file is a ValueError naming it."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
        body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        if body.size != int(np.prod(shape)):
            raise ValueError(f"expected {int(np.prod(shape))} values, found {body.size}")
        return body.reshape(shape)
    except (OSError, EOFError, struct.error, ValueError) as e:
        raise ValueError(f"{path} is missing or corrupt ({e}): reinstall the data or pass another --data-dir") from e


def _has_files(folder: Path) -> bool:
    return all((folder / name).exists() for pair in FILES.values() for name in pair)


def find_data_dir(data_dir: str | os.PathLike | None = None, download: bool = False) -> Path:
    """The folder holding the four gzipped IDX files, by the documented order of places."""
    tried = []
    if data_dir is not None:
        folder = Path(data_dir)
        for candidate in (folder, folder / "FashionMNIST" / "raw"):
            if _has_files(candidate):
                return candidate
        tried.append(f"--data-dir {folder}")
        if not download:
            raise ValueError(
                f"no Fashion-MNIST IDX files (*-ubyte.gz) in {folder}: fix --data-dir, "
                f"install the Debian package dataset-fashion-mnist, or add --download"
            )
    if data_dir is None and _has_files(DEBIAN_DIR):
        return DEBIAN_DIR
    if download:
        root = Path(data_dir) if data_dir is not None else Path.home() / ".cache" / "hawq" / "data"
        try:
            from torchvision.datasets import FashionMNIST

            for train in (True, False):
                FashionMNIST(str(root), train=train, download=True)
        except Exception as e:
            raise ValueError(
                f"downloading Fashion-MNIST into {root} failed ({type(e).__name__}): pass --data-dir with the "
                "IDX files or install the Debian package dataset-fashion-mnist"
            ) from e
        return root / "FashionMNIST" / "raw"
    raise ValueError(
        "Fashion-MNIST not found: pass --data-dir DIR with the *-ubyte.gz files, install the Debian package "
        "dataset-fashion-mnist (apt-get install dataset-fashion-mnist), or add --download"
    )


@dataclass(frozen=True)
class TensorDataset:
    """Normalized images (N, 1, 28, 28) float32 and labels (N,) int64."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int | None) -> TensorDataset:
        return self if n is None or n >= len(self) else TensorDataset(self.images[:n], self.labels[:n])


def load_split(split: str, data_dir: str | os.PathLike | None = None, download: bool = False) -> TensorDataset:
    if split not in FILES:
        raise ValueError(f"unknown split {split!r}: use 'train' or 'test'")
    folder = find_data_dir(data_dir, download)
    img_file, lbl_file = FILES[split]
    images = read_idx(folder / img_file)
    labels = read_idx(folder / lbl_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{folder} holds IDX files of unexpected shapes: they are corrupt; reinstall them")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    x = (x - MEAN) / STD
    return TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))


def batches(
    data: TensorDataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    augment: bool = False,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (images, labels) batches; order and augmentation come from `seed` alone."""
    g = torch.Generator().manual_seed(seed)
    n = len(data)
    order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        x, y = data.images[idx], data.labels[idx]
        if augment:  # horizontal flips: the classes are left-right symmetric
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        yield x, y
