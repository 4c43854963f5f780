"""Ranges of the quantizers: how each fake-quant layer chooses its weight scale and its input range.

Weights (`set_weight_range_`): "mse" clips every output channel at the ratio of its largest magnitude that
minimises ||Q(W) - W||^2 (`hawq.quant.primitives.CLIP_RATIOS`), "max" scales by the largest magnitude.

Activations (`calibrate_activations_`), over calibration batches of each layer's (float-path) input:
    "minmax"      the observed minimum and maximum (what `hawq.calibrate_` records)
    "percentile"  the 0.01% and 99.99% quantiles
    "mse"         [r*min, r*max] with r from the same clip grid, minimising the mean squared error of Q(x)
The samples are a deterministic strided subset (at most `SAMPLES_PER_BATCH` values per batch and layer).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from hawq.quant.api import calibrate_, quant_layers
from hawq.quant.primitives import CLIP_RATIOS, check_weight_range, fake_quant_activation

ACT_RANGES = ("minmax", "percentile", "mse")
SAMPLES_PER_BATCH = 1 << 16
PERCENTILE = 0.9999


def check_act_range(method: str) -> str:
    """Return `method` if it names an activation range, else raise ValueError."""
    if method not in ACT_RANGES:
        raise ValueError(f"activation range {method!r} is unknown: use one of {ACT_RANGES}")
    return method


def set_weight_range_(model: nn.Module, method: str) -> nn.Module:
    """Choose how every fake-quant layer of `model` scales its weight: "mse" (clipped) or "max"."""
    check_weight_range(method)
    for m in quant_layers(model).values():
        m.w_range = method
    return model


def _subsample(x: Tensor) -> Tensor:
    flat = x.detach().reshape(-1).float()
    step = max(1, -(-flat.numel() // SAMPLES_PER_BATCH))  # ceil: at most SAMPLES_PER_BATCH values
    return flat[::step].cpu()


def mse_range(x: Tensor, bits: int) -> tuple[float, float]:
    """[r*lo, r*hi] over the clip grid minimising mean (Q(x) - x)^2; ties keep the wider range."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    best, best_err = (lo, hi), float("inf")
    for r in CLIP_RATIOS:
        err = float((fake_quant_activation(x, r * lo, r * hi, bits) - x).double().pow(2).mean())
        if err < best_err:
            best, best_err = (r * lo, r * hi), err
    return best


def percentile_range(x: Tensor) -> tuple[float, float]:
    """The 0.01% and 99.99% quantiles of x (zero when x does not cross it, as min/max would give)."""
    lo = float(torch.quantile(x, 1 - PERCENTILE)) if float(x.min()) < 0 else float(x.min())
    return lo, float(torch.quantile(x, PERCENTILE))


@torch.no_grad()
def calibrate_activations_(
    model: nn.Module, batches: Iterable[Any], method: str = "minmax", n_batches: int | None = 8
) -> nn.Module:
    """Set every fake-quant layer's input range from `batches` of (inputs, ...) by `method`.

    Layers without activation bits are calibrated too (min/max), as `hawq.calibrate_` does."""
    check_act_range(method)
    if method == "minmax":
        return calibrate_(model, batches, n_batches=n_batches)
    layers = quant_layers(model)
    samples: dict[str, list[Tensor]] = {n: [] for n, m in layers.items() if m.a_bits is not None}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: samples[n].append(_subsample(inp[0])))
             for n, m in layers.items() if n in samples]
    try:
        calibrate_(model, batches, n_batches=n_batches)
    finally:
        for h in hooks:
            h.remove()
    for n, xs in samples.items():
        if not xs:
            continue
        x = torch.cat(xs)
        m = layers[n]
        lo, hi = mse_range(x, m.a_bits) if method == "mse" else percentile_range(x)
        # never wider than what was observed; lo stays >= 0 for an unsigned (post-ReLU) input
        lo = max(lo, float(m.act_min)) if float(m.act_min) < 0 else float(m.act_min)
        m.act_min.fill_(lo)
        m.act_max.fill_(min(hi, float(m.act_max)))
    return model
