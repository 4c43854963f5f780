import pytest
import torch
import torch.nn.functional as F

import hawq
from hawq.alloc import activation_omega, activation_perturbations
from hawq.quant import fake_quant_activation


def test_perturbation_matches_manual_quantization_of_the_layer_input():
    torch.manual_seed(0)
    model = hawq.create_model("tiny_mlp").eval()
    xs = [torch.randn(5, 8), torch.randn(3, 8)]
    got = activation_perturbations(model, [(x, None) for x in xs], ["fc1", "fc2"], bits=(2, 4, 8))
    a1 = torch.cat(xs)  # fc1's input: the data itself (signed: asymmetric grid)
    a2 = F.relu(model.fc1(a1)).detach()  # fc2's input: after a ReLU (unsigned grid)
    for name, a in (("fc1", a1), ("fc2", a2)):
        for b in (2, 4, 8):
            q = fake_quant_activation(a, float(a.min()), float(a.max()), b)
            expected = float((q - a).double().pow(2).sum()) / len(a)
            assert got[name][b] == pytest.approx(expected, rel=1e-6)
        assert got[name][2] > got[name][4] > got[name][8]


def test_omega_is_trace_times_perturbation_and_ignores_negative_traces():
    pert = {"a": {4: 2.0, 8: 0.5}, "b": {4: 1.0, 8: 0.1}}
    om = activation_omega({"a": 3.0, "b": -1.0}, pert)
    assert om == {"a": {4: 6.0, 8: 1.5}, "b": {4: 0.0, 8: 0.0}}
