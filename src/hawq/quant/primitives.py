"""Quantization primitives: pure functions on tensors.

Weights: symmetric, per output channel, narrow range (levels -q..q with q = 2^(b-1) - 1). The scale of a
channel is its largest magnitude times a clip ratio r / q, with r a whole percent (6%..100%, searched coarse to
fine) chosen to minimise the channel's squared error ||Q(W) - W||^2 (range "mse", the default), or r = 1 (range
"max": nothing is clipped). One bit is the sign times the channel's mean magnitude (the scale that
minimises the squared error of sign quantization); an all-zero channel stays zero at every width. Activations: unsigned
when the calibrated range starts at zero or above (after a ReLU), else asymmetric with a zero point.
Rounding passes gradients straight through (STE, Bengio et al. 2013); scales are treated as constants.
"""

from __future__ import annotations

import torch
from torch import Tensor

MIN_BITS, MAX_BITS = 1, 8
WEIGHT_RANGES = ("mse", "max")
# Clip ratios are whole percents of a channel's largest magnitude, 6%..100% (exact, the same on every machine).
CLIP_MIN_PERCENT = 6
CLIP_RATIOS = tuple(k / 100 for k in range(100, CLIP_MIN_PERCENT - 1, -1))  # descending: ties keep less clipping


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


def check_weight_range(method: str) -> str:
    """Return `method` if it names a weight range ("mse" or "max"), else raise ValueError."""
    if method not in WEIGHT_RANGES:
        raise ValueError(f"weight range {method!r} is unknown: use one of {WEIGHT_RANGES}")
    return method


def _sq_err(flat: Tensor, s: Tensor, qmax: int) -> Tensor:
    """Per-row ||Q(w) - w||^2 at per-row scales s (C, 1)."""
    return torch.div(flat, s).round_().clamp_(-qmax, qmax).mul_(s).sub_(flat).pow_(2).sum(dim=1)


def _mse_scale(flat: Tensor, qmax: int) -> Tensor:
    """Per-row scale amax * r / qmax, r = k/100 (k = 6..100) minimising the row's squared error. flat: (C, K).

    Coarse to fine, per row: every fifth percent from 100% down to 10%, then the eight whole percents around
    the best of those (27 passes instead of 95). Ratios are tried in descending order and only a strictly
    smaller error replaces the best, so a tie keeps less clipping; the result is deterministic."""
    amax = flat.abs().amax(dim=1)  # (C,)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))

    def scale(k: Tensor) -> Tensor:  # k: (C,) whole percents; k = 100 gives amax / qmax exactly
        return (safe * (k.to(flat.dtype) / 100) / qmax)[:, None]

    best_k = torch.full_like(amax, 100, dtype=torch.int64)
    best_err = _sq_err(flat, scale(best_k), qmax)
    for steps in (range(95, 9, -5), (4, 3, 2, 1, -1, -2, -3, -4)):
        base = best_k.clone()
        for d in steps:
            k = torch.full_like(base, d) if steps[0] == 95 else (base + d).clamp(CLIP_MIN_PERCENT, 100)
            err = _sq_err(flat, scale(k), qmax)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_k = torch.where(better, k, best_k)
    return amax * (best_k.to(flat.dtype) / 100) / qmax


def weight_scale(w: Tensor, bits: int, method: str = "mse") -> Tensor:
    """Per-output-channel scale, shaped to broadcast against `w` (out, 1, 1, ...).

    Deterministic: the same weight, bits and method give the same scale (a fixed grid, ties to less clipping).
    """
    check_weight_range(method)
    flat = w.detach().reshape(w.shape[0], -1)
    if bits == 1:
        scale = flat.abs().mean(dim=1)
    elif method == "max":
        scale = flat.abs().amax(dim=1) / weight_qmax(bits)
    else:
        scale = _mse_scale(flat, weight_qmax(bits))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero channel: levels 0, scale 1
    return scale.reshape(-1, *([1] * (w.dim() - 1)))


def weight_to_int(w: Tensor, bits: int, method: str = "mse") -> tuple[Tensor, Tensor]:
    """Integer levels (int8) and per-channel scales (shape (out,)) with w ~= levels * scale."""
    scale = weight_scale(w, bits, method)
    wd = w.detach()
    if bits == 1:
        q = torch.where(wd >= 0, 1, -1)
        nonzero = wd.reshape(w.shape[0], -1).ne(0).any(dim=1).reshape(-1, *([1] * (w.dim() - 1)))
        q = torch.where(nonzero, q, 0)  # sign(0) = +1 would turn an all-zero channel into +scale
    else:
        qmax = weight_qmax(bits)
        q = torch.clamp(torch.round(wd / scale), -qmax, qmax)
    return q.to(torch.int8), scale.reshape(-1)


def fake_quant_weight(w: Tensor, bits: int, method: str = "mse") -> Tensor:
    """Quantize then dequantize `w` at `bits`; the gradient passes straight through to `w`.

    The scale is a function of the weight, treated as a constant; the STE is the identity, clipped weights
    included (their scale follows the weight, so the largest weights keep learning)."""
    q, scale = weight_to_int(w, bits, method)
    wq = q.to(w.dtype) * scale.to(w.dtype).reshape(-1, *([1] * (w.dim() - 1)))
    return _PassThrough.apply(w, wq) if w.requires_grad else wq


def weight_perturbation(w: Tensor, bits: int, method: str = "mse") -> float:
    """||Q_b(W) - W||^2, the squared quantization error of a weight tensor."""
    with torch.no_grad():
        return float((fake_quant_weight(w, bits, method) - w).double().pow(2).sum())


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
