"""`hawq run --task lm` on a small folder of text files: every stage, perplexity as the metric."""

from __future__ import annotations

import json

import pytest
import torch

from hawq.cli import main
from hawq.config import RunConfig
from hawq.tasks.lm import CONTEXT, load_text, windows


def _text_folder(root):
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    words = ["def", "return", "self", "import", "for", "in", "if", "else", "print", "value", "(", ")", ":", "\n"]
    for i in range(40):
        picks = torch.randint(0, len(words), (400,), generator=g).tolist()
        (root / f"m{i}.py").write_text(" ".join(words[k] for k in picks))
    return root


def test_text_is_split_by_file_and_windows_predict_the_next_byte(tmp_path):
    data = load_text(RunConfig(task="lm", data_dir=str(_text_folder(tmp_path / "t"))))
    assert data.val.shape[1] == CONTEXT + 1 and len(data.train) > 10 * CONTEXT
    x, y = windows(data.train, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, CONTEXT) and torch.equal(x[:, 1:], y[:, :-1])


def test_lm_task_runs_every_stage_with_perplexity(tmp_path, capsys):
    text = _text_folder(tmp_path / "text")
    out = tmp_path / "run"
    args = ["run", "--quiet", "--task", "lm", "--quick", "--data-dir", str(text), "--out", str(out),
            "--bits", "2", "8", "--budget-bits", "2", "--baselines", "8", "2", "--ft-images", "256",
            "--ft-skip-within", "0.05"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["metric"] == "ppl" and 1 < res["models"]["fp32"]["ppl"] < 256
    traces = json.loads((out / "traces.json").read_text())
    assert traces["method"] == "gn_residual" and any("sequences" in n for n in traces["notes"])
    plan = json.loads((out / "plan.json").read_text())
    assert plan["size_bytes"] <= plan["budget_bytes"]
    fp, m = res["models"]["fp32"]["ppl"], res["models"]
    for name in ("uniform8", "uniform2", "hawq"):  # lower perplexity is better: skipped only when not worse
        assert ("ft_skipped" in m[name]) == (m[name]["ppl_before_ft"] - fp <= 0.05), name
    assert "ft_skipped" not in m["uniform2"] and "ft_skipped" in m["uniform8"]  # 2 bits cost perplexity, 8 not
    for cmd in ("evaluate", "report"):
        assert main([cmd, "--quiet", "--out", str(out)]) == 0
    # export: onnxruntime's next-byte logits against PyTorch's at every position of the validation windows
    capsys.readouterr()
    assert main(["export", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    exp = json.loads((out / "results.json").read_text())["export"]
    v, n_val = exp["verify"], len(load_text(RunConfig(task="lm", data_dir=str(text), quick=True)).val)
    assert (out / "model.onnx").exists() and v["n_samples"] == n_val and v["n_predictions"] == n_val * CONTEXT
    assert v["top1_agreement"] >= 0.999 or v["onnx_float64_mean_abs_diff"] is not None  # or within round-off
    assert f"top-1 agreement {100 * v['top1_agreement']:.2f}% of {n_val * CONTEXT} predictions" in err
    sc = exp["scores"]  # perplexity from each side's logits; PyTorch's is the task's own evaluation of the plan
    assert sc["metric"] == "ppl" and sc["onnx"] == pytest.approx(sc["torch"], rel=1e-5)
    assert sc["torch"] == pytest.approx(m["hawq"]["ppl"], rel=1e-5)
    assert "ppl: onnxruntime" in (out / "report.md").read_text()
