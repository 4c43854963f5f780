import gzip

import pytest
import torch

from hawq.data import batches, find_data_dir, load_split, read_idx


def test_reads_idx_files_and_normalizes(fake_fmnist):
    tr = load_split("train", fake_fmnist)
    assert tr.images.shape == (384, 1, 28, 28) and tr.images.dtype == torch.float32
    assert tr.labels.shape == (384,) and int(tr.labels.max()) <= 9
    raw = read_idx(fake_fmnist / "train-images-idx3-ubyte.gz")
    assert raw.shape == (384, 28, 28)
    assert torch.allclose(tr.images[0, 0], (torch.from_numpy(raw[0].copy()).float() / 255 - 0.2860) / 0.3530)


def test_batches_are_seeded_and_cover_the_data(fake_fmnist):
    data = load_split("test", fake_fmnist)
    a = [y for _, y in batches(data, 50, shuffle=True, seed=3)]
    b = [y for _, y in batches(data, 50, shuffle=True, seed=3)]
    c = [y for _, y in batches(data, 50, shuffle=True, seed=4)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert sorted(torch.cat(a).tolist()) == sorted(data.labels.tolist())


def test_missing_folder_names_all_three_ways(tmp_path, monkeypatch):
    monkeypatch.setattr("hawq.data.fashion_mnist.DEBIAN_DIR", tmp_path / "nothing")
    with pytest.raises(ValueError) as e:
        find_data_dir(None)
    msg = str(e.value)
    assert "--data-dir" in msg and "dataset-fashion-mnist" in msg and "--download" in msg


def test_corrupt_file_is_a_clear_error(fake_fmnist, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in fake_fmnist.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    with gzip.open(bad / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + b"\x00" * 20)
    with pytest.raises(ValueError, match="corrupt"):
        load_split("train", bad)
    (bad / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="corrupt"):
        load_split("test", bad)
