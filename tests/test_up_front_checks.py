"""Input that cannot work is refused before anything is written: one line, exit 2 (issue 14, items 1 and 3)."""

import pytest
import torch

from hawq.cli import main


def _args(fake_fmnist, out, *extra):
    return ["run", "--quick", "--quiet", "--model", "tiny_cnn", "--data-dir", str(fake_fmnist), "--out", str(out),
            *extra]


@pytest.mark.parametrize(
    "device, n_gpus, message",
    [
        ("cuda", 0, "no CUDA device"),
        ("cuda:0", 0, "no CUDA device"),
        ("cuda:1", 1, "cuda:1"),
        ("cuda:x", 1, "unknown device"),
        ("gpu", 1, "unknown device"),
        ("cudafoo", 1, "unknown device"),
    ],
)
def test_unusable_device_is_one_line_exit_2_nothing_written(device, n_gpus, message, fake_fmnist, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n_gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n_gpus)
    out = tmp_path / "out"
    code = main(_args(fake_fmnist, out, "--device", device))
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_stage_command_on_a_run_whose_device_is_gone(fake_fmnist, tmp_path, capsys, monkeypatch):
    """A run folder configured for a GPU, opened on a machine without one: refused before rewriting config.json."""
    from hawq.config import RunConfig
    from hawq.runfolder import RunFolder

    out = tmp_path / "out"
    cfg = RunConfig(model="tiny_cnn", data_dir=str(fake_fmnist), quick=True)
    RunFolder(out).write_config(cfg)
    text = (out / "config.json").read_text().replace('"device": "cpu"', '"device": "cuda:0"')
    (out / "config.json").write_text(text)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    code = main(["allocate", "--quiet", "--out", str(out), "--budget-bits", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "no CUDA device" in err and len(err.strip().splitlines()) == 1, err
    assert (out / "config.json").read_text() == text and sorted(p.name for p in out.iterdir()) == ["config.json"]


@pytest.mark.parametrize("extra", [["--a-bits", "4"], ["--a-bits-options", "4", "8"]])
def test_infeasible_bops_budget_is_refused_up_front(extra, fake_fmnist, tmp_path, capsys):
    """Like an infeasible size budget: before config.json (and before training), not at the allocation stage."""
    out = tmp_path / "out"
    code = main(_args(fake_fmnist, out, *extra, "--budget-gbops", "1e-7"))
    err = capsys.readouterr().err
    assert code == 2 and "raise --budget-gbops" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def _allocate_with_fixed_a_bits(fake_fmnist, out, budget_gbops, **kw):
    """The allocation stage on a run folder with an untrained tiny_cnn and made-up traces (no training)."""
    from hawq import pipeline
    from hawq.artifacts import save_torch, write_json
    from hawq.config import RunConfig

    cfg = RunConfig(model="tiny_cnn", data_dir=str(fake_fmnist), quick=True, a_bits=8, budget_gbops=budget_gbops,
                    baselines=(4,), **kw)
    ctx, data = pipeline.prepare(cfg, out, progress=False)
    torch.manual_seed(0)
    model = ctx.task.build_model(cfg)
    save_torch(out / "fp32.pt", {"state_dict": model.state_dict()})
    write_json(out / "traces.json", "traces", {"layers": [{"fqn": f, "trace": 1.0} for f in ("conv1", "conv2", "fc")]})
    return pipeline.stage_allocate(ctx, data)


def test_bops_budget_with_fixed_activation_bits_is_honoured(fake_fmnist, tmp_path):
    """--a-bits B --budget-gbops G: the weight bits are chosen so that sum MACs * w_bits * B <= G (it was ignored:
    a plan 1e4 times over the budget, recorded as if met)."""
    import json

    free = _allocate_with_fixed_a_bits(fake_fmnist, tmp_path / "free", 1.0)  # cannot bind
    assert set(free.w_bits.values()) == {8}  # no size budget and a BOPs budget that cannot bind
    budget = (free.bops - 1) / 1e9  # just below the unconstrained plan's BOPs: the budget must bind
    plan = _allocate_with_fixed_a_bits(fake_fmnist, tmp_path / "tight", budget)
    assert plan.bops <= budget * 1e9 < free.bops
    assert set(plan.a_bits.values()) == {8}
    doc = json.loads((tmp_path / "tight" / "plan.json").read_text())
    assert doc["bops"] <= doc["budget_gbops"] * 1e9 and doc["budget_bytes"] is None  # no size budget was applied
    sized = _allocate_with_fixed_a_bits(fake_fmnist, tmp_path / "both", budget, budget_mb=free.size_bytes / 2**20)
    assert sized.bops <= budget * 1e9 and sized.size_bytes <= free.size_bytes
