"""`hawq run --task detection` end to end on a few generated canvases: artifacts, and scores that mean what
they say (the scorer gives 100 to an oracle and 0 to a blind detector on the run's own validation set; the
recorded mAPs are those of the saved checkpoints; the plan meets its budget)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import hawq
from hawq.cli import main


class _Oracle(nn.Module):
    """Returns given detections batch after batch, as a detector in eval mode would."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs, self.i = outputs, 0

    def forward(self, images):
        out = self.outputs[self.i : self.i + len(images)]
        self.i += len(images)
        return out


def test_detection_run_writes_artifacts_with_map(fake_fmnist, tmp_path):
    out = tmp_path / "det"
    args = ["run", "--task", "detection", "--quick", "--quiet", "--data-dir", str(fake_fmnist), "--out", str(out),
            "--ft-images", "32", "--baselines", "4", "--trace-max-images", "32"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["metric"] == "map50"
    for name in ("fp32", "hawq", "uniform4"):
        assert 0.0 <= res["models"][name]["map50"] <= 100.0
    traces = json.loads((out / "traces.json").read_text())
    # the detection loss is not cross-entropy but elementwise: Gauss-Newton from its own output Hessian
    assert traces["method"] == "gn_residual" and "output Hessian is elementwise" in traces["reason"]
    plan = json.loads((out / "plan.json").read_text())
    for fixed in ("backbone.convs.0", "head.classification_head.cls_logits", "head.regression_head.bbox_reg"):
        assert plan["layers"][fixed]["w_bits"] == 8
    assert plan["size_bytes"] <= plan["budget_bytes"]
    assert "mAP@0.5" in (out / "report.md").read_text()

    # the scorer the run used, on the run's own validation canvases: 100 for the truth, 0 for nothing
    from hawq import pipeline
    from hawq.data.detection_synth import detection_loader

    ctx, data = pipeline.open_run(out, progress=False)
    truth = [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))}
             for _, ts in detection_loader(data.val, 32) for t in ts]
    assert ctx.task.evaluate(_Oracle(truth), data, progress=False)["map50"] == pytest.approx(100.0)
    blind = [{k: v[:0] for k, v in t.items()} for t in truth]
    assert ctx.task.evaluate(_Oracle(blind), data, progress=False)["map50"] == 0.0

    # the recorded scores are those of the saved checkpoints (fp32.pt, qat/*.pt), evaluated again
    recorded = {k: res["models"][k]["map50"] for k in ("fp32", "hawq", "uniform4")}
    assert main(["evaluate", "--quiet", "--out", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())["models"]
    assert {k: again[k]["map50"] for k in recorded} == pytest.approx(recorded, abs=1e-6)

    # export: refused in one line with exit code 2, nothing written (no model.onnx, results unchanged)
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    proc = subprocess.run([sys.executable, "-m", "hawq.cli", "export", "--out", str(out)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(Path(hawq.__file__).parents[1])})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "cannot run the export stage" in proc.stderr
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before
