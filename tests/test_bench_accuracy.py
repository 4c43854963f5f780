"""The results page of bench/accuracy.py: paired differences, and the plain list of where HAWQ-V2 does not win."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def acc(load_bench):
    return load_bench("accuracy")


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
        rows.append(row(s, "uniform", 70.0 + s, 92.5 + 0.01 * s, bits=(3, 3)))
        # behind by 0.1 with a seed spread of ~1: not a clear win for HAWQ-V2; 0.1 behind after, on every seed:
        # no seed spread, but 5 of 5000 test images is within test-sampling error
        rows.append(row(s, "random", 80.0 + s - 0.1 + (1.0 if s == 0 else -0.5), 90.0 - 0.1, bits=(4, 2)))
        # the same plan as HAWQ-V2 on every seed: a tie, whatever the numbers
        rows.append(row(s, "monotone", 80.0 + s, 90.0, bits=(2, 4)))
    tally: dict = {}
    lines, losses = acc.section(rows, None, ["uniform", "random", "monotone", "hawq"], 5000, tally)
    kinds = {text.split(": ", 1)[1]: kind for kind, text in losses}
    assert kinds == {"uniform is ahead of HAWQ-V2 by 2.51 ± 0.01 points": "behind",
                     "HAWQ-V2 is ahead of random by 0.10 ± 0.50 points": "close-",
                     "HAWQ-V2 is ahead of random by 0.10 ± 0.00 points": "close-",
                     "monotone in trace": "same"}
    assert [t.split(": ")[0] for _, t in losses] == [
        "uniform-3-bit budget, after fine-tuning", "uniform-3-bit budget, before fine-tuning",
        "uniform-3-bit budget, after fine-tuning", "uniform-3-bit budget"]
    assert tally["before"] == {"ahead": [(3.0, "uniform")], "close": [(3.0, "random")], "same": [(3.0, "monotone")]}
    assert tally["after"] == {"behind": [(3.0, "uniform")], "close": [(3.0, "random")], "same": [(3.0, "monotone")]}
    table = [ln for ln in lines if ln.startswith("| uniform")]
    assert len(table) == 1 and "-10.00 ± 0.00" in table[0] and "2.51 ± 0.01" in table[0]


def test_significance_needs_seeds_and_test_images(acc):
    # 3 seeds: Student t with 2 degrees of freedom (4.30), not 2 standard errors
    d = [-1.0, -2.0, -3.0]  # mean -2, standard error 0.577: 3.5 SE, inside 4.30 SE
    assert acc.verdict(d, 80.0, 82.0, 10**9) == "close"
    assert acc.verdict([-1.9, -2.0, -2.1], 80.0, 82.0, 10**9) == "ahead"
    # identical results on every seed: only the test images limit it; worst case sqrt(0.38 / N) at 80%/82%
    assert acc.test_se(80.0, 82.0, 5000) == pytest.approx(100 * (0.38 / 5000) ** 0.5)
    assert acc.verdict([-1.5] * 3, 80.0, 81.5, 5000) == "close"  # 2 x 0.87 > 1.5
    assert acc.verdict([-2.0] * 3, 80.0, 82.0, 5000) == "ahead"
    assert acc.verdict([2.0] * 3, 82.0, 80.0, 5000) == "behind"


def test_runs_without_hawq_claim_no_ties(acc):
    rows = [row(s, "uniform", 80.0, 90.0) for s in range(3)] + [row(s, "random", 70.0, 85.0) for s in range(3)]
    lines, losses = acc.section(rows, None, ["uniform", "random"], 5000)
    assert losses == [] and all("same plans" not in ln for ln in lines)


def test_clear_win_is_not_listed(acc):
    rows = [r for s in range(3) for r in (row(s, "hawq", 85.0 + s, 91.0 + s, bits=(2, 4)),
                                          row(s, "uniform", 80.0 + s, 89.0 + s))]
    _, losses = acc.section(rows, None, ["uniform", "hawq"], 5000)
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
    assert "uniform is ahead of HAWQ-V2 by 0.20 ± 0.00 points" in page
    assert "### A baseline ahead of HAWQ-V2 or equal, not significantly (4)" in page
    assert "### A baseline significantly ahead of HAWQ-V2 (0)" in page
    assert "**1.000**" in page  # Omega and drop in the same order: Spearman 1
    assert (tmp_path / "figures" / "results_accuracy_vs_size.png").stat().st_size > 0
    assert (tmp_path / "figures" / "results_accuracy_vs_size_a4.png").stat().st_size > 0


def test_comparison_with_the_earlier_run_names_grew_held_vanished_appeared(acc):
    def run(lead_uniform, lead_random, lead_fisher):
        rows = []
        for s in range(3):
            rows += [row(s, "hawq", 90.0, 91.0, bits=(2, 4)),
                     row(s, "uniform", 90.0 - lead_uniform + 0.01 * s, 91.0),
                     row(s, "random", 90.0 - lead_random + 0.01 * s, 91.0, bits=(4, 2)),
                     row(s, "fisher", 90.0 - lead_fisher + 0.01 * s, 91.0, bits=(4, 4))]
        return {"settings": {"seeds": [0, 1, 2], "a_bits": 0}, "test_images": 5000, "rows": rows,
                "finished": "then"}

    # HAWQ-V2 significantly ahead of uniform in both (by more now), ahead of random only before, of Fisher only now
    old, new = run(3.0, 3.0, 0.1), run(5.0, 0.1, 3.0)
    lines = acc.previous_lines(new, old, "old.json", ["uniform", "random", "fisher", "hawq"])
    text = "\n".join(lines)
    assert "lead held and grew (1): uniform at 3 bits (+2.99 → +4.99)" in text
    assert "lead vanished (1): random at 3 bits" in text
    assert "lead appeared (1): empirical Fisher at 3 bits" in text
    assert acc.change("ahead", "ahead", 5.0, 2.0) == "held, shrank"
    assert acc.change("ahead", "same", 5.0, 0.0) == "vanished (a tie: same plans)"
    assert acc.change("close", "behind", 0.1, -3.0) == "baseline ahead"
