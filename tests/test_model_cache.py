"""The full-precision model cache shared by the tasks: train once, load after, retrain over a bad file."""

from __future__ import annotations

import torch
from torch import nn

from hawq.tasks.fp32 import cached_or_trained


def make() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def test_trains_once_then_loads(tmp_path, capsys):
    path = tmp_path / "fp32" / "m.pt"
    calls = []

    def train(m: nn.Module) -> dict:
        calls.append(1)
        with torch.no_grad():
            m.weight.fill_(0.5)
        return {"final_loss": 0.25}

    model, rec = cached_or_trained(make(), make, path, "cpu", train, {"cache_key": "k"}, {"epochs": 1})
    assert calls == [1] and rec == {"source": "trained", "cache_key": "k", "final_loss": 0.25}
    assert path.exists() and torch.load(path, weights_only=True)["train"] == {"epochs": 1}

    again, rec2 = cached_or_trained(make(), make, path, "cpu", train, {"cache_key": "k"}, {"epochs": 1})
    assert calls == [1], "a cached model must not be trained again"
    assert rec2 == {"source": f"cache {path}", "cache_key": "k"}
    assert torch.equal(again.weight, torch.full((2, 3), 0.5)) and not again.training

    path.write_bytes(b"not a checkpoint")
    fresh, rec3 = cached_or_trained(make(), make, path, "cpu", train, {}, {})
    assert calls == [1, 1] and rec3["source"] == "trained"
    assert "ignoring the cached model" in capsys.readouterr().err
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["weight"], torch.full((2, 3), 0.5))


def test_cache_of_another_shape_is_retrained(tmp_path, capsys):
    path = tmp_path / "m.pt"
    torch.save({"state_dict": nn.Linear(4, 2).state_dict()}, path)
    trained = []
    model, rec = cached_or_trained(make(), make, path, "cpu", lambda m: trained.append(m) or {}, {}, {})
    assert rec["source"] == "trained" and trained and trained[0] is model
    assert "does not fit the model" in capsys.readouterr().err
