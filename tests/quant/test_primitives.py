import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hawq.quant.primitives import (
    CLIP_RATIOS,
    activation_qparams,
    check_bits,
    fake_quant_activation,
    fake_quant_weight,
    weight_perturbation,
    weight_qmax,
    weight_scale,
    weight_to_int,
)


@pytest.mark.parametrize("method", ["mse", "max"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_fake_quant_equals_quantize_then_dequantize(bits, method):
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(bits))
    q, scale = weight_to_int(w, bits, method)
    assert torch.equal(fake_quant_weight(w, bits, method), q.float() * scale.view(-1, 1, 1, 1))
    qmax = max(weight_qmax(bits), 1)
    assert int(q.abs().max()) <= qmax
    # narrow range: -2^(b-1) is never used
    assert int(q.min()) >= -qmax


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_max_range_keeps_each_channel_extreme(bits):
    w = torch.randn(4, 10) * torch.tensor([[0.01], [1.0], [10.0], [100.0]])
    wq = fake_quant_weight(w, bits, "max")
    assert torch.allclose(wq.abs().amax(1), w.abs().amax(1), rtol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mse_range_is_per_channel_best_on_the_grid_and_deterministic(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(5, 40, generator=g) * torch.tensor([[0.01], [1.0], [10.0], [100.0], [3.0]])
    w[4, 0] = 60.0  # an outlier: clipping it pays off
    err = lambda b, m: (fake_quant_weight(w, b, m) - w).pow(2).sum(1)  # noqa: E731
    assert bool((err(bits, "mse") <= err(bits, "max")).all())
    qmax = weight_qmax(bits)
    for ratio in CLIP_RATIOS[::5]:  # no coarse ratio (every fifth percent) does better on any channel
        s = w.abs().amax(1, keepdim=True) * ratio / qmax
        e = (torch.clamp(torch.round(w / s), -qmax, qmax) * s - w).pow(2).sum(1)
        assert bool((err(bits, "mse") <= e).all())
    assert torch.equal(weight_scale(w, bits), weight_scale(w.clone(), bits))
    assert weight_perturbation(w, bits) < weight_perturbation(w, bits, "max") or bits == 8


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("method", ["mse", "max"])
def test_all_zero_channel_stays_zero(bits, method):
    w = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    w[1] = 0.0
    q, scale = weight_to_int(w, bits, method)
    assert bool((q[1] == 0).all())
    assert bool((fake_quant_weight(w, bits, method)[1] == 0).all())
    assert bool((q[0] != 0).all()) if bits == 1 else True  # other channels keep their signs at one bit


def test_one_bit_all_zero_channel_stays_zero():
    # issue 14 item 4: the scale fell back to 1 and sign(0) = +1 turned the channel into all +1
    w = torch.tensor([[0.5, -0.25, 0.0], [0.0, 0.0, 0.0]])
    q, scale = weight_to_int(w, 1)
    assert q[1].tolist() == [0, 0, 0] and q[0].tolist() == [1, -1, 1]
    assert fake_quant_weight(w, 1)[1].tolist() == [0.0, 0.0, 0.0]


def test_unknown_weight_range_is_refused():
    with pytest.raises(ValueError, match="weight range"):
        fake_quant_weight(torch.ones(2, 2), 4, "minmax")


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 8), st.lists(st.integers(-127, 127), min_size=2, max_size=20), st.floats(1e-3, 10.0))
def test_values_on_the_grid_come_back_exactly(bits, ints, scale):
    qmax = weight_qmax(bits)
    levels = torch.tensor([max(-qmax, min(qmax, i)) for i in ints] + [qmax], dtype=torch.float64)
    w = (levels * scale).view(1, -1)
    assert torch.allclose(fake_quant_weight(w, bits), w, rtol=0, atol=1e-12 * scale)


def test_perturbation_shrinks_with_bits():
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    errs = [weight_perturbation(w, b) for b in (2, 3, 4, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert weight_perturbation(w, 8) < 1e-3 * weight_perturbation(w, 2)


def test_ste_gradient_is_identity_inside_range():
    w = torch.randn(3, 5, requires_grad=True)
    fake_quant_weight(w, 4).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_activation_unsigned_and_asymmetric():
    scale, zp, qmin, qmax = activation_qparams(0.0, 6.0, 4)
    assert zp == 0 and (qmin, qmax) == (0, 15) and scale == pytest.approx(0.4)
    x = torch.linspace(-1, 2, 31)
    y = fake_quant_activation(x, -1.0, 2.0, 8)
    assert (y - x).abs().max() <= (3.0 / 255) / 2 + 1e-6
    assert fake_quant_activation(torch.zeros(3), -1.0, 2.0, 4).abs().max() == 0  # zero is exact


@pytest.mark.parametrize("bad", [0, 9, -1, 2.5, None, True])
def test_bits_outside_range_are_refused(bad):
    with pytest.raises(ValueError, match="bit width"):
        check_bits(bad)
