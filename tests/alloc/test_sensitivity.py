"""Sensitivity tables from a model: Omega = Tr(H)/n * ||Q_b(W)-W||^2, diagonal variant, MACs, errors."""

from __future__ import annotations

import pytest
import torch

import hawq
from hawq.alloc import default_fixed, layer_macs, sensitivity_table
from hawq.quant import fake_quant_weight


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return hawq.create_model("tiny_cnn")


def test_omega_is_trace_times_perturbation(cnn):
    traces = {"conv1": 0.5, "conv2": 2.0, "fc": 0.1}
    table = sensitivity_table(cnn, traces, bits=(8, 2, 4), fixed={"fc": 4})
    assert table.fqns == ("conv1", "conv2", "fc") and table.bits == (2, 4, 8) and table.kind == "trace"
    assert table["fc"].bits == (4,) and table["conv2"].bits == (2, 4, 8)
    for row in table.layers:
        w = cnn.get_submodule(row.fqn).weight
        for b in row.bits:
            pert = float((fake_quant_weight(w, b) - w).detach().double().pow(2).sum())
            assert row.perturbation[b] == pytest.approx(pert, rel=1e-12)
            assert row.omega[b] == pytest.approx(traces[row.fqn] * pert, rel=1e-12)
        assert row.perturbation[row.bits[0]] >= row.perturbation[row.bits[-1]]


def test_default_fixed_and_missing_traces(cnn):
    assert default_fixed(cnn) == {"conv1": 8, "fc": 8}
    table = sensitivity_table(cnn, {"conv2": 1.0})  # fixed layers without trace: trace 0, still counted
    assert table.fqns == ("conv1", "conv2", "fc")
    assert table["conv1"].bits == (8,) and table["conv1"].omega == {8: 0.0}
    only = sensitivity_table(cnn, {"conv2": 1.0}, fixed={})
    assert only.fqns == ("conv2",)
    assert only.other_params == sum(p.numel() for p in cnn.parameters()) - 144


def test_diagonal_variant(cnn):
    traces = {"conv1": 1.0, "conv2": 3.0, "fc": 0.5}
    # A constant diagonal H_jj = t gives exactly half of the trace variant (the 1/2 of the Taylor term).
    diags = {f: torch.full_like(cnn.get_submodule(f).weight, t) for f, t in traces.items()}
    tr = sensitivity_table(cnn, traces, fixed={})
    dg = sensitivity_table(cnn, traces, fixed={}, diagonals=diags)
    assert dg.kind == "diag"
    for a, b in zip(tr.layers, dg.layers):
        for bits in a.bits:
            assert b.omega[bits] == pytest.approx(0.5 * a.omega[bits], rel=1e-12)
    g = torch.Generator().manual_seed(1)
    w = cnn.conv2.weight
    d = torch.rand(w.shape, generator=g)
    dg = sensitivity_table(cnn, traces, fixed={}, diagonals={**diags, "conv2": d})
    ref = 0.5 * float((d.double() * (fake_quant_weight(w, 3) - w).detach().double().pow(2)).sum())
    assert dg["conv2"].omega[3] == pytest.approx(ref, rel=1e-12)
    with pytest.raises(ValueError, match="entries"):
        sensitivity_table(cnn, traces, fixed={}, diagonals={**diags, "fc": torch.ones(3)})
    with pytest.raises(ValueError, match="diagonals lack"):
        sensitivity_table(cnn, traces, fixed={}, diagonals={"conv1": diags["conv1"]})


def test_layer_macs_and_mode(cnn):
    cnn.train()
    macs = layer_macs(cnn, torch.randn(3, 1, 12, 12))
    assert macs == {"conv1": 4 * 144 * 9, "conv2": 4 * 36 * 36, "fc": 40}
    assert cnn.training
    assert not cnn.conv1._forward_hooks


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"traces": {"nope": 1.0}}, "not Conv2d/Linear"),
        ({"traces": {"conv2": float("nan")}}, "finite"),
        ({"traces": {"conv2": 1.0}, "bits": (2, 9)}, "not supported"),
        ({"traces": {"conv2": 1.0}, "bits": ()}, "empty"),
        ({"traces": {"conv2": 1.0}, "fixed": {"bn1": 8}}, "not Conv2d/Linear"),
    ],
)
def test_bad_input_is_value_error(cnn, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sensitivity_table(cnn, **kwargs)


def test_layer_macs_count_every_position_of_a_sequence():
    # BOPs of a language model are per sequence: a Linear on (B, T, C) inputs does T * in * out MACs
    model = hawq.create_model("char_gpt", context=16, d=32, layers=1, heads=2)
    macs = layer_macs(model, torch.randint(0, 256, (3, 16)))
    t = 16
    assert macs == {"blocks.0.qkv": t * 32 * 96, "blocks.0.proj": t * 32 * 32, "blocks.0.fc1": t * 32 * 128,
                    "blocks.0.fc2": t * 128 * 32, "head": t * 32 * 256}
