"""Artifacts are written atomically with the permissions the user's umask allows (not the 0600 of mkstemp)."""

import os
import stat

import pytest

from hawq.artifacts import save_torch, write_json


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_artifacts_respect_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        j = write_json(tmp_path / "a.json", "x", {"a": 1})
        t = save_torch(tmp_path / "sub" / "b.pt", {"a": 1})
    finally:
        os.umask(old)
    for path in (j, t):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.json", "b.pt"]  # no temp left


def test_replacing_an_artifact_keeps_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", "x", {"a": 1})
        write_json(tmp_path / "a.json", "x", {"a": 2})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644


def test_generated_detection_set_folder_respects_the_umask(fake_fmnist, tmp_path):
    from hawq.data.detection_synth import make_detection_set

    old = os.umask(0o022)
    try:
        make_detection_set(tmp_path / "s", fake_fmnist, n_train=1, n_val=1, canvas=32, scale=(0.6, 1.0))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o755  # not mkdtemp's 0700
