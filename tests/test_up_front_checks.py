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
