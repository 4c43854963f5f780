"""bench/lm.py: the significance rule on perplexity differences, and a tiny --quick run into a tmp dir."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def lm(load_bench):
    return load_bench("lm")


def test_verdict_lower_perplexity_wins(lm):
    # d = allocator - HAWQ-V2 perplexity: positive means HAWQ-V2 is lower (better)
    assert lm.verdict([0.50, 0.52, 0.48], test_se=0.01) == "ahead"
    assert lm.verdict([-0.50, -0.52, -0.48], test_se=0.01) == "behind"
    assert lm.verdict([0.5, 0.5, 0.5], test_se=0.3) == "close"  # within twice the test-sampling error
    assert lm.verdict([0.1, 1.0, 2.0], test_se=0.0) == "close"  # within the Student-t interval (4.30 SE)


def test_paired_test_se(lm):
    rng = np.random.default_rng(0)
    ce = rng.normal(2.0, 0.3, 256)
    assert lm.paired_test_se(ce, ce) == 0.0
    shifted = lm.paired_test_se(ce + 0.1, ce)  # a constant shift: no sampling error in the difference
    assert shifted == pytest.approx(0.0, abs=1e-9)
    noisy = ce + rng.normal(0.0, 0.05, 256)
    se = lm.paired_test_se(noisy, ce)
    blocks = (noisy - ce).reshape(-1, lm.BLOCK).mean(1)
    expect = 0.5 * (math.exp(noisy.mean()) + math.exp(ce.mean())) * blocks.std(ddof=1) / math.sqrt(len(blocks))
    assert se == pytest.approx(expect)


@pytest.mark.filterwarnings("ignore:traces stopped before reaching rel_tol")
def test_quick_run_writes_page(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("HAWQ_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "lm.md"
    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", ["bench/lm.py", "--quick"])
    try:
        lm.main(lm.parse(["--quick", "--quiet", "--out", str(out), "--work-dir", str(tmp_path / "work"),
                          "--trace-sequences", "16", "--fisher-sequences", "16", "--ft-sequences", "64",
                          "--val-windows", "32", "--fp32-sequences", "128"]))
    finally:
        torch.set_num_threads(threads)
    page = out.read_text()
    run = json.loads((tmp_path / "lm.json").read_text())
    assert "REDUCED run" in page and "Uniform-2.5-bit budget:" in page
    for name in ("| full precision |", "| uniform |", "| HAWQ-V2 (trace) |", "| 0 | gn_residual | 16 |"):
        assert name in page
    assert {r["allocator"] for r in run["rows"]} == {"fp32", "uniform", "hawq"}
    for r in run["rows"]:
        assert 1.0 < r["before"] < 300.0 and 1.0 < r["after"] < 300.0  # a byte model: at most ~256
        if r["allocator"] != "fp32":
            assert r["size_bytes"] <= r["budget_bytes"] + 1e-9 and r["test_se_before"] >= 0.0
    hawq = next(r for r in run["rows"] if r["allocator"] == "hawq")
    assert hawq["test_se_before"] == 0.0  # against itself
    assert run["seeds_done"] == [0] and run["measures"]["0"]["method"] == "gn_residual"
