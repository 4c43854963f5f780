"""Baseline allocators: within budget, brute-force optimal where they claim it, seeded, and the per-layer
measures (top eigenvalue, empirical Fisher) against dense / per-image computation on tiny nets."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, hessian

import hawq
from hawq.alloc import (
    SensitivityTable,
    eig_bound_plan,
    empirical_fisher,
    fisher_plan,
    hawq_plan,
    model_size_bytes,
    monotone_plan,
    plan_for_bits,
    random_plan,
    rescored_table,
    reversed_plan,
    sensitivity_table,
    top_eigenvalues,
    uniform_plan,
    v1_plan,
)


def traced(table: SensitivityTable, seed: int) -> SensitivityTable:
    """The table with distinct random traces (the factory's rows all have trace 1)."""
    rng = np.random.default_rng(seed + 100)
    rows = tuple(replace(r, trace=float(10 ** rng.uniform(-2, 1))) for r in table.layers)
    return SensitivityTable(rows, table.other_params, table.bits, table.kind)


def budgets(table: SensitivityTable) -> list[float]:
    lo, hi = model_size_bytes(table, 2), model_size_bytes(table, 8)
    return [lo, lo + 0.3 * (hi - lo), lo + 0.6 * (hi - lo), hi, float("inf")]


def brute_min(table, cap_bits, keep=lambda w: True):
    best = None
    for w in itertools.product(*[r.bits for r in table.layers]):
        size = sum(r.n_params * b for r, b in zip(table.layers, w)) + 32 * table.other_params
        om = sum(r.omega[b] for r, b in zip(table.layers, w))
        if size <= cap_bits and keep(w) and (best is None or om < best):
            best = om
    return best


@pytest.mark.parametrize("seed", range(6))
def test_every_baseline_within_budget(table_factory, seed):
    table = traced(table_factory(seed, n_layers=5, fixed={0: 8} if seed % 2 else None), seed)
    scores = {r.fqn: float(i + 1) for i, r in enumerate(table.layers)}
    for budget in budgets(table):
        plans = [
            hawq_plan(table, budget), uniform_plan(table, budget), random_plan(table, budget, seed=seed),
            reversed_plan(table, budget), v1_plan(table, budget, scores), eig_bound_plan(table, budget, scores),
            fisher_plan(table, budget, scores),
            monotone_plan(table, budget),
        ]
        for p in plans:
            assert p.size_bytes <= budget
            assert p.size_bytes == model_size_bytes(table, p.w_bits)
            assert p.omega == pytest.approx(sum(table[f].omega[b] for f, b in p.w_bits.items()))
        # HAWQ has the least Omega of all (the others minimise other scores on the same feasible set)
        assert all(plans[0].omega <= p.omega * (1 + 1e-12) + 1e-12 for p in plans)


@pytest.mark.parametrize("seed", range(4))
def test_score_plans_are_exact_for_their_scores(table_factory, seed):
    table = traced(table_factory(seed, n_layers=5), seed)
    scores = {r.fqn: float(s) for r, s in zip(table.layers, np.random.default_rng(seed).uniform(0, 3, 5))}
    rescored = rescored_table(table, scores)
    for budget in budgets(table)[:4]:
        p = eig_bound_plan(table, budget, scores)
        ref = brute_min(rescored, int(budget * 8))
        assert sum(rescored[f].omega[b] for f, b in p.w_bits.items()) == pytest.approx(ref, rel=1e-12)
        # HAWQ-V1: the eigenvalue per parameter, lambda_i / n_i
        per_param = rescored_table(table, {f: s / table[f].n_params for f, s in scores.items()})
        v = v1_plan(table, budget, scores)
        assert sum(per_param[f].omega[b] for f, b in v.w_bits.items()) == pytest.approx(
            brute_min(per_param, int(budget * 8)), rel=1e-12)
        inv = rescored_table(table, {r.fqn: 1 / r.trace for r in table.layers})
        q = reversed_plan(table, budget)
        assert sum(inv[f].omega[b] for f, b in q.w_bits.items()) == pytest.approx(
            brute_min(inv, int(budget * 8)), rel=1e-12)


def test_rescored_table_checks_scores(table_factory):
    table = table_factory(0, n_layers=3)
    with pytest.raises(ValueError, match="lack"):
        rescored_table(table, {"layer0": 1.0})
    with pytest.raises(ValueError, match="finite"):
        rescored_table(table, {"layer0": 1.0, "layer1": float("nan"), "layer2": 1.0})


def test_reversed_gives_the_flat_layer_more_bits():
    from hawq.alloc import LayerSensitivity

    pert = {2: 1.0, 4: 0.1}
    rows = (LayerSensitivity("sharp", 10, 5.0, (2, 4), pert, {b: 5 * v for b, v in pert.items()}),
            LayerSensitivity("flat", 10, 0.1, (2, 4), pert, {b: 0.1 * v for b, v in pert.items()}))
    table = SensitivityTable(rows, 0, (2, 4))
    budget = 10 * (2 + 4) / 8
    assert hawq_plan(table, budget).w_bits == {"sharp": 4, "flat": 2}
    assert reversed_plan(table, budget).w_bits == {"sharp": 2, "flat": 4}


def test_v1_divides_the_eigenvalue_by_the_layer_size():
    """HAWQ-V1's sensitivity is lambda/n; the eigenvalue bound uses lambda. Here they rank the layers oppositely."""
    from hawq.alloc import LayerSensitivity

    pert = {2: 1.0, 4: 0.1}
    rows = (LayerSensitivity("big", 1000, 1.0, (2, 4), pert, dict(pert)),
            LayerSensitivity("small", 10, 1.0, (2, 4), pert, dict(pert)))
    table = SensitivityTable(rows, 0, (2, 4))
    eig = {"big": 100.0, "small": 10.0}  # per parameter: big 0.1, small 1.0
    budget = (1000 * 4 + 10 * 2) / 8  # one of the two layers at 4 bits, not both
    assert eig_bound_plan(table, budget, eig).w_bits == {"big": 4, "small": 2}
    assert v1_plan(table, budget, eig).w_bits == {"big": 2, "small": 4}


def test_uniform_takes_the_largest_fitting_width(table_factory):
    table = table_factory(1, n_layers=4, fixed={3: 8})
    s3, s4 = model_size_bytes(table, 3), model_size_bytes(table, 4)
    assert uniform_plan(table, s4).w_bits == plan_for_bits(table, 4).w_bits
    assert uniform_plan(table, (s3 + s4) / 2).w_bits == plan_for_bits(table, 3).w_bits  # fractional budget
    assert uniform_plan(table, float("inf")).w_bits == plan_for_bits(table, 8).w_bits
    with pytest.raises(ValueError, match="below"):
        uniform_plan(table, model_size_bytes(table, 2) - 1)


@pytest.mark.parametrize("seed", range(5))
def test_monotone_is_monotone_and_best_among_monotone(table_factory, seed):
    table = traced(table_factory(seed, n_layers=6, fixed={2: 8} if seed % 2 else None), seed)
    free = [i for i, r in enumerate(table.layers) if not r.fixed]
    order = sorted(free, key=lambda i: -table.layers[i].trace)

    def is_monotone(w):
        seq = [w[i] for i in order]
        return all(a >= b for a, b in zip(seq, seq[1:]))

    for budget in budgets(table)[:4]:
        p = monotone_plan(table, budget)
        w = [p.w_bits[r.fqn] for r in table.layers]
        assert is_monotone(w) and p.size_bytes <= budget
        assert p.omega == pytest.approx(brute_min(table, int(budget * 8), is_monotone), rel=1e-12)
    with pytest.raises(ValueError, match="below"):
        monotone_plan(table, model_size_bytes(table, 2) - 1)


def test_random_is_seeded(table_factory):
    table = traced(table_factory(3, n_layers=8), 3)
    budget = budgets(table)[1]
    a, b = random_plan(table, budget, seed=7), random_plan(table, budget, seed=7)
    assert a == b
    draws = {tuple(random_plan(table, budget, seed=s).w_bits.values()) for s in range(12)}
    assert len(draws) > 1


# ------------------------------------------------------------------------ eigenvalues and Fisher
def dense_block(model, x, y, name):
    params = {k: v.detach() for k, v in model.named_parameters()}
    key = f"{name}.weight"

    def f(w):
        return F.cross_entropy(functional_call(model, {**params, key: w}, (x,)), y)

    w = params[key]
    return hessian(f)(w).reshape(w.numel(), w.numel())


@pytest.mark.parametrize("method", ["hvp", "gauss_newton"])
@pytest.mark.parametrize("arch", ["tiny_mlp", "tiny_cnn"])
def test_top_eigenvalues_match_dense_hessian(arch, method):
    torch.manual_seed(0)
    model = hawq.create_model(arch).double().eval()
    x = torch.randn(16, 8, dtype=torch.float64) if arch == "tiny_mlp" else torch.randn(
        12, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3 if arch == "tiny_mlp" else 10, (len(x),))
    names = hawq.quantizable_layers(model)
    # two batches: the estimate averages over all images, as the dense reference does
    eig = top_eigenvalues(model, [(x[:7], y[:7]), (x[7:], y[7:])], method=method, iters=300, tol=1e-9,
                         chunk_size=8, progress=False)
    for name in names:
        evals = torch.linalg.eigvalsh(dense_block(model, x, y, name))
        top = evals[evals.abs().argmax()]
        assert eig[name] == pytest.approx(float(top), rel=1e-4, abs=1e-10)
    assert model.training is False and all(p.requires_grad for p in model.parameters())
    if method == "gauss_newton":  # a ReLU net: auto takes the Gauss-Newton products
        assert top_eigenvalues(model, [(x, y)], method="auto", iters=3, progress=False) == top_eigenvalues(
            model, [(x, y)], method="gauss_newton", iters=3, progress=False)


def test_top_eigenvalues_rejects_bad_arguments():
    model = hawq.create_model("tiny_mlp")
    with pytest.raises(ValueError, match="iters"):
        top_eigenvalues(model, [(torch.randn(2, 8), torch.zeros(2, dtype=torch.long))], iters=0)
    with pytest.raises(ValueError, match="empty"):
        top_eigenvalues(model, [])
    with pytest.raises(ValueError, match="method"):
        top_eigenvalues(model, [(torch.randn(2, 8), torch.zeros(2, dtype=torch.long))], method="lanczos")


def test_empirical_fisher_matches_per_image_gradients():
    torch.manual_seed(1)
    model = hawq.create_model("tiny_cnn").double()
    x, y = torch.randn(10, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (10,))
    got = empirical_fisher(model, [(x[:6], y[:6]), (x[6:], y[6:])], chunk_size=4, progress=False)
    model.eval()
    names = hawq.quantizable_layers(model)
    ref = dict.fromkeys(names, 0.0)
    for i in range(len(y)):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, [model.get_submodule(n).weight for n in names])
        for n, g in zip(names, grads):
            ref[n] += float(g.pow(2).sum()) / g.numel() / len(y)
    assert got == pytest.approx(ref, rel=1e-10)
    assert empirical_fisher(model, [(x, y)], max_images=3, progress=False) != got  # max_images counts


def test_baselines_on_a_real_table_quantize():
    torch.manual_seed(0)
    model = hawq.create_model("tiny_cnn")
    traces = {"conv1": 1.0, "conv2": 2.0, "fc": 0.5}
    table = sensitivity_table(model, traces, progress=False)
    budget = model_size_bytes(table, 3)
    for p in (monotone_plan(table, budget), random_plan(table, budget, seed=1), uniform_plan(table, budget)):
        q = hawq.quantize_(hawq.create_model("tiny_cnn"), p)
        assert q(torch.randn(2, 1, 8, 8)).shape == (2, 10)
