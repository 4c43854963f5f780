"""A task a user brings, in one file: a `hawq.tasks.Task` subclass registered and run through every stage."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

from hawq.cli import main
from hawq.tasks import Task, register_task
from hawq.tasks.fp32 import cache_dir, cached_or_trained


class Blobs(Task):
    """Four Gaussian blobs in 8 dimensions, an MLP, accuracy in percent."""

    name = "toy"
    metric = "acc"
    metrics = ("acc",)
    defaults = {"epochs": 20, "batch_size": 32, "lr": 0.05, "ft_images": 256, "ft_lr": 0.01, "trace_max_images": 128}

    def load_data(self, cfg):
        g = torch.Generator().manual_seed(0)
        centres = torch.randn(4, 8, generator=g) * 3
        y = torch.randint(0, 4, (512,), generator=g)
        x = centres[y] + torch.randn(512, 8, generator=g)
        return {"train": (x[:384], y[:384]), "test": (x[384:], y[384:])}

    def build_model(self, cfg):
        torch.manual_seed(cfg.seed)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))

    def _fit(self, model, data, n_images, lr):
        x, y = data["train"]
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        for _ in range(max(1, n_images // 32)):
            i = torch.randint(0, len(x), (32,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
        return model.eval()

    def full_precision_model(self, cfg, data, progress):
        return cached_or_trained(self.build_model(cfg), lambda: self.build_model(cfg),
                                 cache_dir() / "fp32" / f"toy-{cfg.seed}.pt", cfg.device,
                                 lambda m: self._fit(m, data, cfg.epochs * 384, cfg.lr) and {}, {}, {})

    def evaluate(self, model, data, progress):
        x, y = data["test"]
        with torch.no_grad():
            return {"acc": 100.0 * float((model(x).argmax(1) == y).float().mean())}

    def example_input(self, data):
        return data["train"][0][:1]

    def trace_batches(self, cfg, data):
        x, y = data["train"]
        return [(x[i : i + 64], y[i : i + 64]) for i in range(0, len(x), 64)]

    def calibration_batches(self, data):
        return [(data["train"][0],)]

    def export_batches(self, data):
        return [data["test"]]

    def finetune(self, model, data, cfg, n_images, teacher, progress, desc):
        model.train()
        self._fit(model, data, n_images, cfg.ft_lr)
        return {"n_images": n_images}


def test_a_registered_task_runs_every_stage(tmp_path):
    register_task("toy", "blobs", Blobs)
    out = tmp_path / "toy"
    args = ["run", "--quiet", "--task", "toy", "--dataset", "blobs", "--out", str(out), "--baselines", "4",
            "--bits", "2", "4", "8", "--quantize-first-last", "--ft-skip-within", "-1"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["metric"] == "acc" and res["models"]["fp32"]["acc"] > 90  # four well-separated blobs
    assert {"hawq", "uniform4"} <= set(res["models"]) and res["models"]["hawq"]["ft_images"] == 256
    assert json.loads((out / "traces.json").read_text())["method"] == "hybrid"  # ReLU MLP, cross-entropy
    for cmd in ("trace", "allocate", "finetune", "evaluate", "export", "report"):
        assert main([cmd, "--quiet", "--out", str(out)]) == 0, cmd
    res = json.loads((out / "results.json").read_text())
    assert res["export"]["verify"]["top1_agreement"] == 1.0 and (out / "model.onnx").exists()
    assert "acc" in (out / "report.md").read_text()
