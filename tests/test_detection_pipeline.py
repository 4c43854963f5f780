"""`hawq run --task detection` end to end on a few generated canvases (mechanics, not accuracy)."""

import json

from hawq.cli import main


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
    assert traces["method"] == "hutchinson"  # the detection loss is not cross-entropy
    plan = json.loads((out / "plan.json").read_text())
    for fixed in ("backbone.convs.0", "head.classification_head.cls_logits", "head.regression_head.bbox_reg"):
        assert plan["layers"][fixed]["w_bits"] == 8
    assert "mAP@0.5" in (out / "report.md").read_text()
