"""The trace methods by name, the options of one estimation, and the `auto` rule.

Every method estimates the average Hessian trace Tr(H_l)/n_l of every layer with a standard error that
includes data sampling; they differ in what they compute per chunk of images (accumulator.py does the step):

  exact         Gauss-Newton, every class summed (C backward vectors per image). The Hessian trace on layers
                proved piecewise linear in their weights (curvature.py), the GN trace elsewhere.
  hybrid        Gauss-Newton: `exact` on uncertain images (1 - ||p||^2 >= 0.5; above 16 classes the 8 most
                probable classes exactly and 4 importance-sampled from the rest), one importance-sampled
                class on confident images. Unbiased for the GN trace.
  gn_residual   hybrid's exact GN part plus Hutchinson probes of the residual H - G on the curved layers
                only, each layer its own probe (residual.py): unbiased for the Hessian trace on any net
                with double backward.
  mc_fisher     GN with one label per image drawn from p (unbiased; noisy on uncertain images).
  mc_fisher_is  GN with one importance-sampled label per image (unbiased).
  hutchinson    Rademacher probes of true Hessian-vector products: any loss and network, noisy.
  auto          cross-entropy on logits (B, C): hybrid where every layer is proved piecewise linear,
                else gn_residual (hybrid, with a note, where double backward is missing); another loss whose
                Hessian w.r.t. the output is elementwise (focal, L1/smooth-L1, squared error): gn_residual with
                the Gauss-Newton part from that output Hessian (output_hessian.py); any other loss: hutchinson.

Sequences (logits (B, T, C) with targets (B, T), `hutchinson.cross_entropy`): one sequence is one sample,
its loss the mean over its tokens (targets -100 left out); the Gauss-Newton methods sum a sequence's tokens
with a random sign per token and backward vector (unbiased; exact for T = 1), every sequence in the per-token
mode of uncertain images, and gn_residual adds the residual as for images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from hawq.hessian.curvature import ModelInfo, describe
from hawq.hessian.hutchinson import LossFn, NoDoubleBackwardError, find_no_double_backward
from hawq.hessian.output_hessian import elementwise_loss
from hawq.hessian.residual import residual_unreachable
from hawq.hessian.steps import gauss_newton, gn_residual, hutchinson


@dataclass(frozen=True)
class Method:
    name: str
    step: Callable[..., None]  # one chunk: steps/<file>.step(run, model, modules, method, x, y, loss_fn, n_probes)
    gauss_newton: bool  # per-sample GN values (needs cross-entropy on logits (B, C))
    residual: bool = False  # probes H - G on the curved layers
    summary: str = ""


_TABLE = (
    Method("exact", gauss_newton.step, True, summary="Gauss-Newton, every class summed"),
    Method("hybrid", gauss_newton.step, True,
           summary="Gauss-Newton, exact on uncertain images, importance-sampled classes elsewhere"),
    Method("gn_residual", gn_residual.step, True, True,
           summary="Gauss-Newton plus a probed residual H - G on curved layers"),
    Method("mc_fisher", gauss_newton.step, True, summary="Gauss-Newton, one sampled label per image"),
    Method("mc_fisher_is", gauss_newton.step, True, summary="Gauss-Newton, one importance-sampled label per image"),
    Method("hutchinson", hutchinson.step, False, summary="Hutchinson probes of Hessian-vector products"),
)
BY_NAME = {m.name: m for m in _TABLE}
METHODS = ("auto", *BY_NAME)
# Probes per chunk where `probes_per_batch` is not given. gn_residual: one (per layer) per chunk, as the
# chunk-to-chunk spread of the residual is mostly data, not probes (measured once on the nets of
# bench/curved.py with estimate_traces(probes_per_batch=1 or 2): two cost 1.5-1.75x the time and shrank the
# largest error bar by 0-15%); hutchinson: four, whose spread gives the floor of ProbeSpread.
PROBES_PER_CHUNK = {"gn_residual": 1, "hutchinson": 4}


@dataclass(frozen=True)
class TraceOptions:
    """Everything besides the model, the data and the layers that decides an estimation."""

    method: str = "auto"
    loss: str | LossFn = "cross_entropy"
    rel_tol: float = 0.05
    min_share: float = 0.01
    max_images: int | None = 4096
    max_probes: int = 200
    chunk_size: int = 64
    seed: int = 0
    progress: bool = True
    diagonal: bool = False
    state_path: str | Path | None = None
    probes_per_batch: int | None = None  # None: PROBES_PER_CHUNK of the method used
    activations: bool = False

    def probes_for(self, method: str) -> int:
        """Probes per chunk: the option, else the method's default (PROBES_PER_CHUNK); gn_residual takes two
        where `max_images` allows fewer than 8 chunks, so that their spread floors the error bar (ProbeSpread)."""
        if self.probes_per_batch is not None:
            return self.probes_per_batch
        if self.activations:
            return 1
        few = self.max_images is not None and -(-self.max_images // self.chunk_size) < 8
        return 2 if method == "gn_residual" and few else PROBES_PER_CHUNK.get(method, 1)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if not self.rel_tol > 0:
            raise ValueError(f"rel_tol must be > 0, got {self.rel_tol}")
        if not 0 <= self.min_share < 1:
            raise ValueError(f"min_share must be in [0, 1), got {self.min_share}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images must be >= 1 or None, got {self.max_images}")
        if self.max_probes < 1 or self.chunk_size < 1:
            raise ValueError("max_probes and chunk_size must be >= 1")
        if self.probes_per_batch is not None and self.probes_per_batch < 1:
            raise ValueError(f"probes_per_batch must be >= 1, got {self.probes_per_batch}")


@dataclass(frozen=True)
class Choice:
    method: str
    curved: tuple[int, ...]  # layers whose residual is probed (gn_residual)
    reason: str  # why this method, for traces.json
    notes: tuple[str, ...]  # what the numbers mean where they are not the Hessian trace
    loss_gn: bool = False  # gn_residual's Gauss-Newton part from the loss's own output Hessian (output_hessian.py)


def choose(
    opts: TraceOptions,
    info: ModelInfo,
    names: Sequence[str],
    model: nn.Module,
    params: Sequence[Tensor],
    probe: tuple[Tensor, Tensor],
    loss_fn: LossFn,
) -> Choice:
    """The method for this model, loss and data (the `auto` rule), with a reason and one note at most."""
    ce = opts.loss == "cross_entropy"
    sequences = info.out_dim == 3 and probe[1].dim() == 2  # logits (B, T, C), targets (B, T)
    logits = info.out_dim == 2 or (sequences and not opts.activations)
    foreign = [names[i] for i, (u, c) in enumerate(zip(info.used, info.calls)) if u and c == 0]
    unsplit = [f"{names[i]} {why}" for i, why in sorted(info.unsplit.items())]
    curved = tuple(info.curved_layers())
    shape = describe(info, names) if curved else ""
    pl = "every layer proved piecewise linear in its weights (Gauss-Newton = Hessian)"
    method = opts.method
    # a loss other than cross-entropy: Gauss-Newton from its own output Hessian where that is elementwise
    loss_gn_why = "the loss is cross-entropy"
    if not ce and not opts.activations and method in ("auto", "gn_residual"):
        loss_gn_why = ("layers whose per-image traces are impossible" if unsplit or foreign else
                       elementwise_loss(model, probe[0], probe[1], loss_fn, torch.Generator().manual_seed(0)))
    loss_gn = not loss_gn_why
    if method == "auto":
        if unsplit and ce and logits:
            method = "hutchinson"
            reason = f"layer {unsplit[0]}: per-image traces impossible; Hessian-vector products"
        elif foreign and ce and logits:
            method = "hutchinson"
            reason = (f"the weights of {', '.join(foreign[:3])} are used without calling the layer: per-sample "
                      "gradients cannot see them; Hessian-vector products")
        elif loss_gn:
            method = "gn_residual"
            reason = ("the loss is not cross-entropy, its output Hessian is elementwise: Gauss-Newton from it"
                      + (f"; curved: {shape}" if curved else f"; {pl}"))
        elif not ce or not logits:
            why = (f"the loss is not cross-entropy ({loss_gn_why})" if not ce
                   else "activation traces of sequences" if sequences
                   else "the model's output is not logits (B, C) or (B, T, C)")
            method, reason = "hutchinson", f"{why}: Hessian-vector products"
        elif not curved:
            method, reason = "hybrid", pl
        elif opts.activations:
            method, reason = "hutchinson", f"curved: {shape}; activation traces by Hessian-vector products"
        else:
            method, reason = "gn_residual", f"curved: {shape}"
    else:
        reason = "asked for" + (f"; {pl}" if not curved else f"; curved: {shape}")
    m = BY_NAME[method]
    if m.gauss_newton and unsplit:
        raise ValueError(f"layer {unsplit[0]}: per-image traces are impossible; leave it out of `layers` or use "
                         "method='hutchinson'")
    if m.gauss_newton and foreign:
        raise ValueError(f"layers {', '.join(foreign[:3])}: their weights are used without calling the layer, so "
                         "per-sample gradients cannot see them: use method='hutchinson' or leave them out of `layers`")
    if m.gauss_newton and not ce and not loss_gn:
        need = ("loss='cross_entropy' or an elementwise loss" if method == "gn_residual" else "loss='cross_entropy'")
        raise ValueError(f"method={method!r} needs {need} ({loss_gn_why}); use method='hutchinson' for "
                         f"{opts.loss!r}")
    if m.gauss_newton and not logits and not loss_gn:
        raise ValueError("per-sample traces need a model returning logits (B, C) (weights: or (B, T, C) with "
                         "targets (B, T)): use method='hutchinson'")
    notes: list[str] = []
    if loss_gn:
        notes.append("the loss is not cross-entropy: the Gauss-Newton part comes from the loss's own output Hessian "
                     "(elementwise; random signs over the output elements, unbiased, inside the standard errors)")
    if m.gauss_newton and sequences and not loss_gn and probe[1].shape[1] > 1:
        notes.append("sequences: one sequence is one sample; its Gauss-Newton part sums the tokens with random "
                     "signs (unbiased, not exact; the sign noise is inside the standard errors)")
    probed: tuple[int, ...] = ()
    if m.residual and curved:
        x, y = probe
        bad = residual_unreachable(model, [names[i] for i in curved], [params[i] for i in curved], x, y, loss_fn)
        if bad:
            method = "hybrid"
            notes.append(
                f"no double backward through layers {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}: "
                f"traces are Gauss-Newton traces on the curved layers ({shape}); the true Hessian trace may differ"
            )
            reason += "; residual impossible (no double backward), Gauss-Newton only"
        else:
            probed = curved
            notes.append(f"curved layers ({shape}): Gauss-Newton trace plus a probed residual, unbiased for "
                         "the Hessian trace")
    elif m.gauss_newton and curved:
        notes.append(f"Gauss-Newton approximates the Hessian on the curved layers ({shape})")
    elif not m.gauss_newton and not opts.activations:
        x, y = probe
        bad_layers = find_no_double_backward(model, names, params, x, y, loss_fn)
        if bad_layers:
            if opts.method == "auto" and ce and logits:
                method = "exact"
                notes.append(f"no double backward through layers {', '.join(bad_layers)}: fell back to exact "
                             "(Gauss-Newton) traces; the true Hessian trace may differ")
            else:
                raise NoDoubleBackwardError(bad_layers, "second derivative missing")
        elif curved:
            notes.append(f"curved layers ({shape}): Hessian-vector products")
    elif opts.activations and curved:
        notes.append(f"curved layers ({shape}): Hessian-vector products")
    return Choice(method, probed, reason, tuple(notes), loss_gn and method == "gn_residual")


__all__ = ["BY_NAME", "METHODS", "Choice", "Method", "TraceOptions", "choose"]
