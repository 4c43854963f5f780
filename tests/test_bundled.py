"""Bundled full-precision models, the --quick run's borrowed model, fine-tuning skipped where a plan loses
nothing, and the wall time of every stage at the end of a run."""

from __future__ import annotations

import json

import pytest
import torch

import hawq.tasks.classification as cls
from hawq.cli import main
from hawq.config import RunConfig
from hawq.tasks import fp32

TINY = dict(model="tiny_cnn", epochs=1, batch_size=64)


def _no_training(*_, **__):
    raise AssertionError("the model was trained although a matching one was at hand")


@pytest.fixture
def bundle(fake_fmnist, tmp_path, monkeypatch):
    """A bundle folder holding tiny_cnn trained on the fake data by `make_bundled`."""
    folder = tmp_path / "bundled"
    monkeypatch.setattr(fp32, "BUNDLED_DIR", folder)
    monkeypatch.setenv("HAWQ_CACHE", str(tmp_path / "cache"))  # an empty cache of this test's own
    cfg = RunConfig(data_dir=str(fake_fmnist), **TINY)
    path, record = cls.make_bundled(cfg, folder, progress=False)
    return cfg, path, record


def test_bundled_model_is_used_when_its_name_and_training_data_match(bundle, monkeypatch):
    cfg, path, record = bundle
    assert torch.load(path, weights_only=True)["train_data"]["n"] == 384 and 0 <= record["top1"] <= 100
    monkeypatch.setattr(cls, "train_data_parallel", _no_training)
    model, rec = cls.full_precision_model(cfg, cls.load_data(cfg), progress=False)
    assert rec["source"] == f"bundled {path.name}"
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_bundled_model_is_not_used_on_other_data_of_the_same_size(bundle, tmp_path, make_fmnist):
    cfg, _, _ = bundle
    other = make_fmnist(tmp_path / "other", seed=1)  # same sizes, so the same name: other images
    cfg = cfg.replace(data_dir=str(other))
    _, rec = cls.full_precision_model(cfg, cls.load_data(cfg), progress=False)
    assert rec["source"] == "trained"


def test_retrain_ignores_the_bundled_and_the_cached_model(bundle):
    cfg, _, _ = bundle
    cfg = cfg.replace(retrain=True)
    for _ in range(2):  # the second time the cache holds it too
        _, rec = cls.full_precision_model(cfg, cls.load_data(cfg), progress=False)
        assert rec["source"] == "trained"


def test_quick_run_borrows_the_full_runs_model(bundle, monkeypatch):
    cfg, path, _ = bundle
    monkeypatch.setattr(cls, "train_data_parallel", _no_training)
    quick = cfg.replace(quick=True)
    _, rec = cls.full_precision_model(quick, cls.load_data(quick), progress=False)
    assert rec["source"] == f"bundled {path.name} (the full run's model)"


def test_quick_run_without_a_full_model_trains_its_own(fake_fmnist, monkeypatch, tmp_path):
    monkeypatch.setattr(fp32, "BUNDLED_DIR", tmp_path / "empty")
    monkeypatch.setenv("HAWQ_CACHE", str(tmp_path / "cache"))
    quick = RunConfig(data_dir=str(fake_fmnist), quick=True, seed=7, **TINY)
    _, rec = cls.full_precision_model(quick, cls.load_data(quick), progress=False)
    assert rec["source"] == "trained" and rec["train"]["n_images"] == 384  # one epoch of the quick subset


def test_plans_that_lose_nothing_are_not_fine_tuned_and_stage_times_are_printed(fake_fmnist, tmp_path, capsys):
    base = ["run", "--model", "tiny_cnn", "--data-dir", str(fake_fmnist), "--epochs", "1", "--bits", "2", "8",
            "--ft-images", "64", "--baselines", "8", "2", "--trace-max-images", "64", "--bn-images", "0"]

    def models(name: str, *extra: str) -> dict:
        assert main([*base, *extra, "--out", str(tmp_path / name)]) == 0
        return json.loads((tmp_path / name / "results.json").read_text())["models"]

    ms = models("a")
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("wall time: "))
    assert [part.split()[0] for part in line[11:].split("; ")[0].split(", ")] == [
        "fp32", "trace", "allocate", "finetune", "report"] and "; total " in line
    fp = ms.pop("fp32")["top1"]
    for name, m in ms.items():  # the rule: skipped exactly where the post-trained plan is within 0.2 points
        close = m["top1_before_ft"] >= fp - 0.2
        assert ("ft_skipped" in m) == close, name
        assert m["ft_images"] == (0 if close else 64), name

    ms = models("all", "--ft-skip-within", "100")
    assert all("ft_skipped" in m and m["ft_images"] == 0 and m["top1"] == m["top1_before_ft"]
               for k, m in ms.items() if k != "fp32")
    assert "(not fine-tuned)" in (tmp_path / "all" / "report.md").read_text()
    qat = torch.load(tmp_path / "all" / "qat" / "hawq.pt", weights_only=True)
    assert qat["finetune"] == {}

    ms = models("none", "--ft-skip-within", "-1")
    assert not any("ft_skipped" in m for m in ms.values())
    assert all(m["ft_images"] == 64 for k, m in ms.items() if k != "fp32")


def test_quick_run_says_its_numbers_are_not_the_benchmarks(fake_fmnist, tmp_path, capsys):
    args = ["run", "--quick", "--model", "tiny_cnn", "--data-dir", str(fake_fmnist), "--out", str(tmp_path / "q"),
            "--ft-images", "32", "--baselines", "4", "--epochs", "1"]
    assert main(args) == 0
    assert "not the benchmark's" in capsys.readouterr().out
    assert "not the benchmark's" in (tmp_path / "q" / "report.md").read_text()


@pytest.mark.slow
def test_bundled_default_model_is_reproduced_by_its_recipe(tmp_path):
    """Retrain the default model from its recipe and compare with the bundled file (about 4 min on 2 cores)."""
    cfg = RunConfig()
    data = cls.load_data(cfg)
    name = cls.cache_file_name(cfg, cls.cache_key(cfg, cls.fp_train_config(cfg, len(data.train)), len(data.train)))
    bundled = fp32.BUNDLED_DIR / name
    assert bundled.exists(), f"no bundled default model {name}: run scripts/make_bundled.py"
    shipped = torch.load(bundled, weights_only=True)
    assert shipped["train_data"]["fingerprint"] == fp32.data_fingerprint(data.train)
    path, record = cls.make_bundled(cfg, tmp_path, progress=False)
    assert path.name == name
    assert abs(record["top1"] - shipped["made_with"]["top1"]) <= 0.3, (record, shipped["made_with"])
    made = shipped["made_with"]
    if (record["torch"], record["threads"]) == (made["torch"], made["threads"]):  # same torch and threads: same bits
        new = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.equal(v, new[k]) for k, v in shipped["state_dict"].items())
