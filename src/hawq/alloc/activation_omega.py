"""Activation sensitivity (HAWQ-V2, Sec. 3.4): Omega_a(b) = Tr(H_a)/n * E_i ||Q_b(a_i) - a_i||^2 per layer input.

The ranges are calibrated on the same batches (min/max, as `hawq.calibrate_` does); Q_b is the project's
activation quantizer (unsigned after a ReLU, else asymmetric).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hawq.quant.primitives import check_bits, fake_quant_activation


def _inputs(batch: Any) -> Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def activation_perturbations(
    model: nn.Module, batches: Iterable[Any], layers: Sequence[str], bits: Sequence[int], n_batches: int = 4
) -> dict[str, dict[int, float]]:
    """Per layer and bit width: the mean over images of ||Q_b(a_i) - a_i||^2 for the layer's input a_i."""
    for b in bits:
        check_bits(b)
    mods = dict(model.named_modules())
    missing = [n for n in layers if n not in mods]
    if missing:
        raise ValueError(f"layers {missing} are not in the model: pass names from hawq.quantizable_layers(model)")
    held = [_inputs(b) for _, b in zip(range(n_batches), batches)]
    if not held:
        raise ValueError("no calibration batches: pass at least one batch of inputs")
    device = next(model.parameters()).device
    lo = {n: float("inf") for n in layers}
    hi = {n: float("-inf") for n in layers}
    sq = {n: {b: 0.0 for b in bits} for n in layers}
    count = 0
    phase = "range"

    def hook(name: str):
        def fn(_m: nn.Module, args: tuple) -> None:
            a = args[0].detach()
            if phase == "range":
                lo[name] = min(lo[name], float(a.min()))
                hi[name] = max(hi[name], float(a.max()))
            else:
                for b in bits:
                    err = fake_quant_activation(a, lo[name], hi[name], b) - a
                    sq[name][b] += float(err.double().pow(2).sum())

        return fn

    was_training = model.training
    model.eval()
    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in layers]
    try:
        for x in held:
            model(x.to(device))
        phase = "error"
        for x in held:
            model(x.to(device))
            count += len(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: {b: sq[n][b] / count for b in bits} for n in layers}


def activation_omega(
    traces: Mapping[str, float], perturbations: Mapping[str, Mapping[int, float]]
) -> dict[str, dict[int, float]]:
    """Omega_a(b) = average activation trace * perturbation; a negative trace counts as zero."""
    return {n: {b: max(float(traces[n]), 0.0) * float(p) for b, p in perturbations[n].items()}
            for n in perturbations if n in traces}
