"""Plans: size accounting, errors, JSON round trips, and `hawq.quantize_(model, plan)`."""

from __future__ import annotations

import json

import pytest
import torch

import hawq
from hawq.alloc import (
    MB,
    FrontierPoint,
    Plan,
    SensitivityTable,
    best_plan,
    fp32_size_bytes,
    min_size_bytes,
    model_size_bytes,
    pareto_frontier,
    plan_for_bits,
    sensitivity_table,
    size_report,
    sizing_table,
)
from hawq.artifacts import dumps
from hawq.quant import QuantConv2d, QuantLinear


@pytest.fixture
def cnn_table():
    torch.manual_seed(0)
    model = hawq.create_model("tiny_cnn")
    traces = {n: 1.0 + i for i, n in enumerate(hawq.quantizable_layers(model))}
    return model, sensitivity_table(model, traces, example_input=torch.randn(2, 1, 8, 8))


def test_size_counts_parameters_by_hand(cnn_table):
    model, table = cnn_table
    # tiny_cnn: conv1 36 (no bias), bn1 4+4, conv2 144 + 4 bias, fc 40 + 10 bias; running stats not counted.
    assert [r.n_params for r in table.layers] == [36, 144, 40]
    assert table.other_params == 4 + 4 + 4 + 10
    bits = {"conv1": 8, "conv2": 3, "fc": 8}
    assert model_size_bytes(table, bits) == (36 * 8 + 144 * 3 + 40 * 8 + 22 * 32) / 8
    assert fp32_size_bytes(table) == 4 * sum(p.numel() for p in model.parameters())
    rep = size_report(table, plan_for_bits(table, bits))
    assert rep["size_bytes"] == model_size_bytes(table, bits)
    assert rep["compression"] == pytest.approx(fp32_size_bytes(table) / rep["size_bytes"])
    assert rep["quantized_fp32_bytes"] == 4 * 220
    assert rep["quantized_bytes"] == (36 * 8 + 144 * 3 + 40 * 8) / 8
    assert rep["avg_w_bits"] == pytest.approx((36 * 8 + 144 * 3 + 40 * 8) / 220)
    assert rep["quantized_compression"] == pytest.approx(32 / rep["avg_w_bits"])


def test_uniform_plan_keeps_fixed_layers(cnn_table):
    _, table = cnn_table
    plan = plan_for_bits(table, 2, a_bits=8)
    assert plan.w_bits == {"conv1": 8, "conv2": 2, "fc": 8}
    assert set(plan.a_bits.values()) == {8}
    assert plan.omega == pytest.approx(sum(table[f].omega[b] for f, b in plan.w_bits.items()))
    with pytest.raises(ValueError, match="not a candidate"):
        plan_for_bits(table, 5)
    with pytest.raises(ValueError, match="not an option"):
        plan_for_bits(table, {"conv1": 4, "conv2": 2})
    with pytest.raises(ValueError, match="lacks layer"):
        plan_for_bits(SensitivityTable(table.layers, 0, table.bits), {"conv1": 8})


def test_bops_counts_macs(cnn_table):
    _, table = cnn_table
    # 8x8 input: conv1 4*64 outputs x 9 MACs, conv2 after pool 4*16 outputs x 36, fc 10 x 4.
    assert [r.macs for r in table.layers] == [4 * 64 * 9, 4 * 16 * 36, 40]
    plan = plan_for_bits(table, {"conv2": 4}, a_bits=None)
    assert plan.bops == 2304 * 8 * 32 + 2304 * 4 * 32 + 40 * 8 * 32
    plan = plan_for_bits(table, {"conv2": 4}, a_bits=4)
    assert plan.bops == 2304 * 8 * 4 + 2304 * 4 * 4 + 40 * 8 * 4


@pytest.mark.parametrize("budget", [0, -1.0, float("nan")])
def test_non_positive_budget_is_value_error(cnn_table, budget):
    _, table = cnn_table
    with pytest.raises(ValueError, match="positive"):
        best_plan(table, budget)


def test_infeasible_budget_message(cnn_table):
    _, table = cnn_table
    smallest = model_size_bytes(table, 2)
    with pytest.raises(ValueError) as err:
        best_plan(table, smallest - 0.125)
    msg = str(err.value)
    assert f"{smallest / MB:.6g} MB" in msg and "lowest bit width" in msg and "--budget-mb" in msg
    assert best_plan(table, smallest).size_bytes == smallest


def test_json_round_trips(cnn_table):
    _, table = cnn_table
    again = SensitivityTable.from_dict(json.loads(dumps(table.to_dict())))
    assert again == table and again.layers[1].omega == table.layers[1].omega
    plan = best_plan(table, model_size_bytes(table, 4))
    assert Plan.from_dict(json.loads(dumps(plan.to_dict()))) == plan
    joint_like = plan_for_bits(table, 3, a_bits=4)
    assert Plan.from_dict(json.loads(dumps(joint_like.to_dict()))) == joint_like
    for p in pareto_frontier(table):
        assert FrontierPoint.from_dict(json.loads(dumps(p.to_dict()))) == p


def test_quantize_accepts_plan(cnn_table):
    model, table = cnn_table
    plan = best_plan(table, model_size_bytes(table, 3))
    hawq.quantize_(model, plan)
    for fqn, bits in plan.layers.items():
        m = model.get_submodule(fqn)
        assert isinstance(m, (QuantConv2d, QuantLinear))
        assert (m.w_bits, m.a_bits) == (bits["w_bits"], bits["a_bits"])
    model(torch.randn(2, 1, 8, 8))
    hawq.quantize_(model, Plan.from_dict(plan.to_dict()))  # a plan read back from JSON works too


def test_infinite_budget_takes_the_most_precise_plan(cnn_table):
    _, table = cnn_table
    assert best_plan(table, float("inf")) == plan_for_bits(table, 8)


def test_sizing_table_matches_sensitivity_sizes(cnn_table):
    model, table = cnn_table
    sizing = sizing_table(model)
    assert sizing.fqns == table.fqns and sizing.other_params == table.other_params
    for b in (2, 3, 4, 8):
        assert model_size_bytes(sizing, b) == model_size_bytes(table, b)
    assert min_size_bytes(sizing) == min_size_bytes(table) == model_size_bytes(table, 2)
    free = sizing_table(model, bits=(3, 4), fixed={})
    assert min_size_bytes(free) == (220 * 3 + 22 * 32) / 8


def test_table_reads_back_from_a_run_artifact(cnn_table):
    """In sensitivity.json the envelope's "kind" is the artifact's; the table's own kind is "measure"."""
    _, table = cnn_table
    d = table.to_dict()
    d["measure"] = d.pop("kind")
    assert SensitivityTable.from_dict({**d, "kind": "sensitivity", "version": 1}) == table
