"""Shared fixtures: a tiny Fashion-MNIST look-alike written as gzipped IDX files, and an isolated cache."""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_fake_fmnist(folder: Path, n_train: int = 384, n_test: int = 128, seed: int = 0) -> Path:
    """Ten classes, each a bright bar at its own position plus noise: learnable in one short epoch."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n)
        images = rng.integers(0, 60, size=(n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c : 5 + 2 * c, 4:24] = 250
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return folder


@pytest.fixture(scope="session")
def fake_fmnist(tmp_path_factory) -> Path:
    return make_fake_fmnist(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture
def make_fmnist():
    """`make_fake_fmnist` itself, for tests that need a second data set."""
    return make_fake_fmnist


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Tests never read or fill the user's model cache."""
    old = os.environ.get("HAWQ_CACHE")
    os.environ["HAWQ_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("HAWQ_CACHE", None)
    else:
        os.environ["HAWQ_CACHE"] = old


@pytest.fixture(scope="session")
def load_bench():
    """A loader of bench/<name>.py as a module (the benches are scripts, not a package)."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).resolve().parents[1] / "bench"
                                                      / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load
