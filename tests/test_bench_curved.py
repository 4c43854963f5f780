"""bench/curved.py: the page's target line counts a model only where a row of it meets every condition."""

from __future__ import annotations

import argparse


def _row(model, tol, wall, worst, rho, same):
    g = {"wall_s": wall, "images": [1, 1], "worst_rel_se": worst, "spearman": rho, "same_plan": same,
         "plan_gap": 0.0 if same else 0.01, "reason": "curved: GELU"}
    return {"model": model, "acc": 80.0, "n_layers": 3, "rel_tol": tol, "gn_residual": g, "hutchinson": dict(g)}


def test_target_line_needs_time_precision_rank_and_plan_in_one_row(load_bench):
    curved = load_bench("curved")
    args = argparse.Namespace(epochs=1, max_images=60000, threads=2, note="")
    rows = [
        _row("convnext_tiny", 0.05, [60, 62], [0.05, 0.049], 1.0, True),  # meets
        _row("efficientnet_tiny", 0.05, [27, 11], [0.05, 0.049], 0.99, False),  # plans differ
        _row("efficientnet_tiny", 0.025, [68, 66], [0.025, 0.025], 1.0, True),  # meets at the tighter tolerance
        _row("vit_tiny", 0.05, [100, 130], [0.05, 0.05], 0.99, True),  # one seed over 120 s
    ]
    page = curved.render(rows, args)
    assert "met by gn_residual on 2 of 3 models: convnext_tiny (rel. tol. 5%), efficientnet_tiny (rel. tol. 2.5%)." \
        in page
    rows[0]["gn_residual"]["worst_rel_se"] = [0.051, 0.04]
    assert "on 1 of 3 models: efficientnet_tiny" in curved.render(rows, args)
    rows[2]["gn_residual"]["spearman"] = 0.97
    assert "on 0 of 3 models." in curved.render(rows, args)
    assert "| efficientnet_tiny | 80.00% | 3 | 2.5% | gn_residual | 68, 66 |" in page
