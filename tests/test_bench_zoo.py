"""bench/zoo.py: the page renders rows, failures and the summary from the JSON side file (no models run)."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("zoo", Path(__file__).resolve().parents[1] / "bench" / "zoo.py")
zoo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(zoo)


def test_render_counts_passes_and_failures():
    ok = {"model": "resnet18", "resolution": 224, "params": 1e7, "attention": "none to decompose", "errors": {},
          "trace": {"method": "hybrid", "reason": "r", "notes": [], "n_images": 4, "n_backward": 48,
                    "max_rel_stderr": 0.1},
          "trace_stage_s": 8.0, "plan": {"hist": "4b:2 8b:2", "size_mb": 1.0, "budget_mb": 1.0},
          "quantize": {"finite": True, "top1_vs_fp32": 1.0}, "export": {"opset": 21, "file_mb": 1.0},
          "onnxruntime": {"top1_agreement": 1.0, "max_abs_diff": 1e-6}, "peak_rss_mib": 1024, "row_s": 10}
    bad = {"model": "vit_b_16",
           "errors": {"trace": "killed: RSS 11 GiB (during trace)", "plan": "skipped: row stopped"}}
    md = zoo.render({"rows": {"resnet18": ok, "vit_b_16": bad}})
    assert "| resnet18 | 224 |" in md and "| 12.0 | 2.0 |" in md
    assert "1 of 2 rows pass every stage" in md
    assert "trace fails on 1: vit_b_16 (killed" in md and "plan fails" not in md
