"""Activation and weight ranges of hawq.quant.ranges."""

from __future__ import annotations

import torch
from torch import nn

import hawq
from hawq.quant.primitives import fake_quant_activation
from hawq.quant.ranges import calibrate_activations_, mse_range, percentile_range, set_weight_range_


def test_mse_range_is_no_worse_than_minmax_and_deterministic():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50_000, generator=g).relu() ** 2  # long-tailed, unsigned
    lo, hi = mse_range(x, 4)
    err = lambda a, b: float((fake_quant_activation(x, a, b, 4) - x).pow(2).mean())  # noqa: E731
    assert lo == 0.0 and hi < float(x.max())
    assert err(lo, hi) < err(0.0, float(x.max()))
    assert mse_range(x.clone(), 4) == (lo, hi)
    plo, phi = percentile_range(x)
    assert plo == float(x.min()) and phi < float(x.max())


def test_calibrate_activations_sets_ranges_inside_the_observed_ones():
    torch.manual_seed(0)
    model = hawq.quantize_(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)),
                           {"0": {"w_bits": 4, "a_bits": 4}, "2": {"w_bits": 4, "a_bits": 4}})
    data = [(torch.randn(64, 8),) for _ in range(3)]
    hawq.calibrate_(model, data)
    observed = {n: (float(m.act_min), float(m.act_max)) for n, m in hawq.quant.quant_layers(model).items()}
    for method in ("percentile", "mse"):
        calibrate_activations_(model, data, method)
        for n, m in hawq.quant.quant_layers(model).items():
            lo, hi = observed[n]
            assert lo <= float(m.act_min) <= 0.0 or float(m.act_min) == lo
            assert float(m.act_max) <= hi
        assert float(model[2].act_min) == 0.0  # the input after a ReLU stays unsigned


def test_set_weight_range_switches_the_quantizer():
    torch.manual_seed(0)
    model = hawq.quantize_(nn.Sequential(nn.Linear(64, 4)), {"0": 2})
    w = model[0].weight
    clipped = model[0].quant_weight().clone()
    set_weight_range_(model, "max")
    assert torch.equal(model[0].quant_weight(), hawq.quant.fake_quant_weight(w, 2, "max"))
    assert not torch.equal(model[0].quant_weight(), clipped)
