"""Quantization primitives: pure functions on tensors.

Weights: symmetric, per output channel, narrow range (levels -q..q with q = 2^(b-1) - 1), scale from the
channel's largest magnitude. One bit is the sign times the channel's mean magnitude. Activations: unsigned
when the calibrated range starts at zero or above (after a ReLU), else asymmetric with a zero point.
Rounding passes gradients straight through (STE, Bengio et al. 2013); scales are treated as constants.
"""

from __future__ import annotations

import torch
from torch import Tensor

MIN_BITS, MAX_BITS = 1, 8


def check_bits(bits: int) -> int:
    """Return `bits` if it is a supported bit width (1..8), else raise ValueError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bit width {bits!r} is not supported: use whole numbers from {MIN_BITS} to {MAX_BITS}")
    return bits


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest; the gradient passes through unchanged (straight-through estimator).

    >>> x = torch.tensor([0.4, 1.6], requires_grad=True)
    >>> round_ste(x).sum().backward(); x.grad.tolist()
    [1.0, 1.0]
    """
    return x + (torch.round(x) - x).detach()


class _PassThrough(torch.autograd.Function):
    """Returns `y` exactly; the gradient goes to `x` unchanged (STE without float round-off in the value)."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor) -> Tensor:  # noqa: ARG004
        return y.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def weight_qmax(bits: int) -> int:
    """Largest integer level of a narrow-range symmetric grid (0 for one bit: sign only)."""
    return 2 ** (check_bits(bits) - 1) - 1


def weight_scale(w: Tensor, bits: int) -> Tensor:
    """Per-output-channel scale, shaped to broadcast against `w` (out, 1, 1, ...)."""
    flat = w.detach().reshape(w.shape[0], -1)
    if bits == 1:
        scale = flat.abs().mean(dim=1)
    else:
        scale = flat.abs().amax(dim=1) / weight_qmax(bits)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero channel stays zero
    return scale.reshape(-1, *([1] * (w.dim() - 1)))


def weight_to_int(w: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Integer levels (int8) and per-channel scales (shape (out,)) with w ~= levels * scale."""
    scale = weight_scale(w, bits)
    if bits == 1:
        q = torch.where(w.detach() >= 0, 1, -1)
    else:
        qmax = weight_qmax(bits)
        q = torch.clamp(torch.round(w.detach() / scale), -qmax, qmax)
    return q.to(torch.int8), scale.reshape(-1)


def fake_quant_weight(w: Tensor, bits: int) -> Tensor:
    """Quantize then dequantize `w` at `bits`; the gradient passes straight through to `w`.

    The scale comes from the weight itself, so nothing is clipped and the STE is the identity."""
    q, scale = weight_to_int(w, bits)
    wq = q.to(w.dtype) * scale.to(w.dtype).reshape(-1, *([1] * (w.dim() - 1)))
    return _PassThrough.apply(w, wq) if w.requires_grad else wq


def weight_perturbation(w: Tensor, bits: int) -> float:
    """||Q_b(W) - W||^2, the squared quantization error of a weight tensor."""
    with torch.no_grad():
        return float((fake_quant_weight(w, bits) - w).double().pow(2).sum())


def activation_qparams(lo: float, hi: float, bits: int) -> tuple[float, int, int, int]:
    """(scale, zero_point, qmin, qmax) for the calibrated range [lo, hi].

    Unsigned when lo >= 0 (zero point 0, levels 0..2^b-1); otherwise asymmetric with the range widened to
    hold zero exactly, so that zero padding is represented without error.
    """
    check_bits(bits)
    levels = 2**bits - 1
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo <= 0:
        return 1.0, 0, 0, levels
    scale = (hi - lo) / levels
    zero_point = int(round(-lo / scale))
    return scale, zero_point, 0, levels


def fake_quant_activation(x: Tensor, lo: float, hi: float, bits: int) -> Tensor:
    """Quantize then dequantize an activation with its calibrated range; STE inside the range."""
    scale, zero_point, qmin, qmax = activation_qparams(lo, hi, bits)
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale
