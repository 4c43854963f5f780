"""Post-training steps: a quantized model at its best before any gradient step.

    1. weight ranges    every fake-quant layer clips its weight per channel (range "mse", see hawq.quant.ranges)
    2. activations      input ranges calibrated on data (min/max, percentile or error-minimising)
    3. batch norm       running statistics re-estimated in train mode over calibration images, weights frozen
                        (the float statistics no longer describe the quantized layers' outputs)
    4. bias correction  for a model without batch norm: every quantized layer with a bias subtracts the mean
                        output error of its quantized weight, E_x[(Q(W) - W) x] per channel, with x the
                        layer's input in the quantized model (Nagel et al. 2019, "Data-Free Quantization",
                        empirical variant)

`post_train_(model, make_batches, PostTrainConfig())` runs them in that order; fine-tuning then starts from the
post-trained model. `make_batches` returns a fresh iterable of (inputs, ...) each call (several passes).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hawq.quant import QuantConv2d, quant_layers
from hawq.quant.primitives import check_weight_range
from hawq.quant.ranges import calibrate_activations_, check_act_range, set_weight_range_


@dataclass(frozen=True)
class PostTrainConfig:
    """What the post-training steps do (hawq's defaults); `PostTrainConfig.off()` is quantization as it was
    before these steps existed: max-scaled weights, float batch-norm statistics, min/max activations."""

    weight_range: str = "mse"
    bn_images: int = 4096  # 0: keep the float running statistics
    act_range: str = "mse"
    bias_correction: bool = True  # only for models without batch norm
    calib_batches: int = 8

    def __post_init__(self) -> None:
        check_weight_range(self.weight_range)
        check_act_range(self.act_range)
        if self.bn_images < 0:
            raise ValueError(f"bn_images must be zero or positive, got {self.bn_images}")

    @classmethod
    def off(cls) -> PostTrainConfig:
        return cls(weight_range="max", bn_images=0, act_range="minmax", bias_correction=False)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _inputs(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _n(x: Any) -> int:
    return x.shape[0] if isinstance(x, Tensor) else len(x)


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def reestimate_bn_(model: nn.Module, batches: Iterable[Any], n_images: int = 4096) -> int:
    """Replace every batch norm's running mean/variance by their average over `n_images` of `batches`,
    the rest of the model in eval mode and no weight changed. Returns the number of images used."""
    bns = batch_norms(model)
    if not bns or n_images <= 0:
        return 0
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all batches, not an exponential one
        bn.train()
    seen = 0
    try:
        for batch in batches:
            if seen >= n_images:
                break
            x = _inputs(batch)[: n_images - seen]
            if _n(x) < 2:  # train-mode batch norm needs two values per channel
                break
            _forward(model, x)
            seen += _n(x)
    finally:
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
        model.train(was_training)
    return seen


@torch.no_grad()
def bias_correct_(model: nn.Module, batches: Iterable[Any], n_images: int = 1024) -> list[str]:
    """Subtract E_x[(Q(W) - W) x] from the bias of every weight-quantized layer that has one (x: the layer's
    input in the quantized model, over `n_images`). Returns the corrected layers' names."""
    layers = {n: m for n, m in quant_layers(model).items() if m.w_bits is not None and m.bias is not None}
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def fn(m: nn.Module, inp: tuple) -> None:
            x = inp[0]
            dw = m.quant_weight() - m.weight
            if isinstance(m, QuantConv2d):
                y = m._conv_forward(x, dw, None)  # (B, C, H, W)
                mean, k = y.transpose(0, 1).reshape(y.shape[1], -1).sum(1), y.numel() // y.shape[1]
            else:
                y = F.linear(x, dw)
                mean, k = y.reshape(-1, y.shape[-1]).sum(0), y.numel() // y.shape[-1]
            sums[name] = sums.get(name, 0) + mean.double()
            counts[name] = counts.get(name, 0) + k

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in batches:
            if seen >= n_images:
                break
            x = _inputs(batch)
            _forward(model, x)
            seen += _n(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for n, s in sums.items():
        layers[n].bias.sub_((s / counts[n]).to(layers[n].bias.dtype))
    return sorted(sums)


def _forward(model: nn.Module, x: Tensor | list[Tensor]) -> Any:
    """The model on a batch of inputs (a tensor, or a list of images) moved to the model's device."""
    device = next(model.parameters()).device
    return model(x.to(device) if isinstance(x, Tensor) else [t.to(device) for t in x])


def _finite_outputs(model: nn.Module, batches: Iterable[Any]) -> bool:
    """One calibration batch through the model (activation quantization off) gives finite outputs."""
    layers = list(quant_layers(model).values())
    flags = [m.calibrating for m in layers]
    ranges = [(m.act_min.clone(), m.act_max.clone()) for m in layers]
    was = model.training
    model.eval()
    try:
        for m in layers:
            m.calibrating = True  # pass-through inputs: only the float path is checked
        with torch.no_grad():
            for batch in batches:
                x = _inputs(batch)
                out = _forward(model, x)
                vals = out.values() if isinstance(out, dict) else out
                outs = [out] if isinstance(out, Tensor) else [t for t in vals if isinstance(t, Tensor)]
                return all(bool(torch.isfinite(t).all()) for t in outs)
    finally:
        for m, f, (lo, hi) in zip(layers, flags, ranges):
            m.calibrating = f
            m.act_min.copy_(lo)  # the check's own min/max recording is not a calibration
            m.act_max.copy_(hi)
        model.train(was)
    return True


def post_train_(model: nn.Module, make_batches: Callable[[], Iterable[Any]], cfg: PostTrainConfig) -> dict:
    """Run the post-training steps on a model already passed through `hawq.quantize_`; returns a record."""
    set_weight_range_(model, cfg.weight_range)
    acts = any(m.a_bits is not None for m in quant_layers(model).values())
    if acts:
        calibrate_activations_(model, make_batches(), cfg.act_range, cfg.calib_batches)
    record: dict[str, Any] = {**cfg.to_dict(), "bn_images_used": 0, "bias_corrected": []}
    if batch_norms(model):
        saved = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
        record["bn_images_used"] = reestimate_bn_(model, make_batches(), cfg.bn_images)
        if record["bn_images_used"] and not _finite_outputs(model, make_batches()):
            # too few calibration images for some channel (near-zero variance): the statistics overflow
            model.load_state_dict(saved, strict=False)
            record["bn_images_used"] = 0
            record["bn_skipped"] = "re-estimated statistics gave non-finite outputs; kept the float statistics"
            warnings.warn(f"batch-norm re-estimation skipped: {record['bn_skipped']}", stacklevel=2)
    elif cfg.bias_correction:
        record["bias_corrected"] = bias_correct_(model, make_batches())
    if acts and (record["bn_images_used"] or record["bias_corrected"]):
        calibrate_activations_(model, make_batches(), cfg.act_range, cfg.calib_batches)  # the new distributions
    return record
