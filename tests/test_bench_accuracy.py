"""The results page of bench/accuracy.py: paired differences, and the plain list of where HAWQ-V2 does not win."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def acc():
    spec = importlib.util.spec_from_file_location("bench_accuracy", ROOT / "bench" / "accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def row(seed, name, before, after, bits=(3, 3), a_bits=None, budget=3.0):
    return {"seed": seed, "budget_bits": budget, "budget_bytes": 1024.0, "allocator": name, "a_bits": a_bits,
            "size_bytes": 1000.0, "bops": 1e9, "omega": 0.1, "omega_diag": 0.1,
            "w_bits": {f"l{i}": b for i, b in enumerate(bits)}, "before": before, "after": after}


def test_mean_se_matches_definition(acc):
    m, s = acc.mean_se([1.0, 2.0, 4.0])
    assert m == pytest.approx(7 / 3)
    var = sum((x - 7 / 3) ** 2 for x in (1.0, 2.0, 4.0)) / 2
    assert s == pytest.approx((var / 3) ** 0.5)


def test_losses_name_every_case(acc):
    rows = []
    for s in range(3):
        rows.append(row(s, "hawq", 80.0 + s, 90.0, bits=(2, 4)))
        # clearly behind before, clearly ahead after fine-tuning
        rows.append(row(s, "uniform", 70.0 + s, 90.5 + 0.01 * s, bits=(3, 3)))
        # behind by 0.1 with a seed spread of ~1: not a clear win for HAWQ-V2
        rows.append(row(s, "random", 80.0 + s - 0.1 + (1.0 if s == 0 else -0.5), 90.0 - 0.1, bits=(4, 2)))
        # the same plan as HAWQ-V2 on every seed: a tie, whatever the numbers
        rows.append(row(s, "monotone", 80.0 + s, 90.0, bits=(2, 4)))
    lines, losses = acc.section(rows, None, ["uniform", "random", "monotone", "hawq"])
    text = "\n".join(losses)
    assert "after fine-tuning: uniform is ahead of HAWQ-V2 by 0.51" in text
    assert "before fine-tuning: uniform" not in text
    assert "before fine-tuning: HAWQ-V2 leads random by only" in text
    assert "monotone in trace chose the same plans as HAWQ-V2 on every seed" in text
    table = [ln for ln in lines if ln.startswith("| uniform")]
    assert len(table) == 1 and "-10.00 ± 0.00" in table[0] and "0.51 ± 0.01" in table[0]


def test_clear_win_is_not_listed(acc):
    rows = [r for s in range(3) for r in (row(s, "hawq", 85.0 + s, 91.0 + s, bits=(2, 4)),
                                          row(s, "uniform", 80.0 + s, 89.0 + s))]
    _, losses = acc.section(rows, None, ["uniform", "hawq"])
    assert losses == []


def test_render_writes_page_from_raw_records(acc, tmp_path):
    rows = [r for s in range(2) for b in (3.0, 2.5) for a in (None, 4)
            for r in (row(s, "hawq", 85.0, 91.0, bits=(2, 4), a_bits=a, budget=b),
                      row(s, "uniform", 84.0, 91.2, a_bits=a, budget=b))]
    settings = dict(acc.FULL, seeds=[0, 1], allocators=["uniform", "hawq"], budgets=[3.0, 2.5])
    run = {"settings": settings, "test_images": 5000, "argv": ["bench/accuracy.py", "--seeds", "0", "1"],
           "rows": rows, "random": [{"omega": o, "omega_diag": o, "size_bytes": 1000.0, "drop": 2 * o}
                                    for o in (0.1, 0.3, 0.2, 0.5)],
           "measures": {"0": {"wall_s": {"traces": 1, "diag": 1, "eig": 1, "fisher": 1}, "cached": None}},
           "source": "a test", "fp32_top1": 92.0, "ft_s": [1.0], "eval_s": [1.0], "wall_s": 60.0,
           "load": [0.1, 0.2], "machine": "test machine", "finished": "2026-01-01 00:00 UTC"}
    raw = tmp_path / "results.json"
    raw.write_text(json.dumps(run))
    out = tmp_path / "results.md"
    acc.write_page(json.loads(raw.read_text()), out, raw)
    page = out.read_text()
    assert "REDUCED run" in page and "`seeds=[0, 1]`" in page
    assert "## Weights and 4-bit activations" in page
    assert "uniform is ahead of HAWQ-V2 by 0.20" in page
    assert "**1.000**" in page  # Omega and drop in the same order: Spearman 1
    assert (tmp_path / "figures" / "results_accuracy_vs_size.png").stat().st_size > 0
    assert (tmp_path / "figures" / "results_accuracy_vs_size_a4.png").stat().st_size > 0
