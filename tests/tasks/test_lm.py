"""`hawq run --task lm` on a small folder of text files: every stage, perplexity as the metric."""

from __future__ import annotations

import json
import subprocess
import sys

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


def test_lm_task_runs_every_stage_with_perplexity(tmp_path):
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
    proc = subprocess.run([sys.executable, "-m", "hawq.cli", "export", "--out", str(out)], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "cannot run the export stage" in proc.stderr and not (out / "model.onnx").exists()
