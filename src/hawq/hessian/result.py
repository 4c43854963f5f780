"""Result types of the trace estimators and the running sums behind them.

`LayerTrace.trace` is the *average* trace Tr(H_l)/n_l; `stderr` is its standard error over independent
samples (images for the per-sample estimators, (batch, probe) means for Hutchinson), so data sampling is
included in every reported error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class LayerTrace:
    fqn: str
    n_params: int
    trace: float  # average trace Tr(H_l)/n_l
    stderr: float  # standard error of `trace`, data sampling included (inf from a single sample)
    n_samples: int  # images (per-sample methods) or probe evaluations (hutchinson)
    converged: bool  # reached rel_tol, or below min_share of the total and so not required to

    @property
    def rel_stderr(self) -> float:
        return self.stderr / abs(self.trace) if self.trace != 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {
            "fqn": self.fqn,
            "n_params": self.n_params,
            "trace": self.trace,
            "stderr": self.stderr if math.isfinite(self.stderr) else None,  # None: one sample only
            "n_samples": self.n_samples,
            "converged": self.converged,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerTrace:
        return cls(
            fqn=str(d["fqn"]),
            n_params=int(d["n_params"]),
            trace=float(d["trace"]),
            stderr=math.inf if d["stderr"] is None else float(d["stderr"]),
            n_samples=int(d["n_samples"]),
            converged=bool(d["converged"]),
        )


@dataclass(frozen=True)
class TraceResult:
    method: str  # the method actually used: "exact", "hybrid", "gn_residual", "mc_fisher", "mc_fisher_is", "hutchinson"
    layers: tuple[LayerTrace, ...]  # in the order of the `layers` argument
    n_images: int
    n_backward: int  # Gauss-Newton: images x backward vectors (one image, one class = 1); Hutchinson: HVPs
    wall_s: float
    history: dict[str, list[list[float]]]  # fqn -> [[images_processed, mean, stderr], ...]
    notes: tuple[str, ...] = ()
    reason: str = ""  # why this method (what `auto` saw), e.g. "piecewise linear in every layer's weights"
    # per-layer curvature diagonal (same shape as the weight) when asked for; not part of to_dict
    diagonals: dict[str, Tensor] | None = field(default=None, compare=False, repr=False)

    @property
    def backward_per_image(self) -> float:
        """Gauss-Newton methods: backward vectors per image (C for exact, about 1-12 for hybrid)."""
        return self.n_backward / max(self.n_images, 1)

    def means(self) -> dict[str, float]:
        return {lt.fqn: lt.trace for lt in self.layers}

    def stderrs(self) -> dict[str, float]:
        return {lt.fqn: lt.stderr for lt in self.layers}

    def __getitem__(self, fqn: str) -> LayerTrace:
        for lt in self.layers:
            if lt.fqn == fqn:
                return lt
        raise KeyError(fqn)

    @property
    def converged(self) -> bool:
        return all(lt.converged for lt in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "layers": [lt.to_dict() for lt in self.layers],
            "n_images": self.n_images,
            "n_backward": self.n_backward,
            "wall_s": self.wall_s,
            "history": {k: [list(map(float, row)) for row in v] for k, v in self.history.items()},
            "notes": list(self.notes),
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TraceResult:
        return cls(
            method=str(d["method"]),
            layers=tuple(LayerTrace.from_dict(x) for x in d["layers"]),
            n_images=int(d["n_images"]),
            n_backward=int(d["n_backward"]),
            wall_s=float(d["wall_s"]),
            history={str(k): [list(map(float, row)) for row in v] for k, v in d.get("history", {}).items()},
            notes=tuple(str(x) for x in d.get("notes", ())),
            reason=str(d.get("reason", "")),
        )


class RunningStats:
    """Per-layer sums of samples and squared samples in float64 (checkpointable as a plain dict)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.count = 0
        self.sum = torch.zeros(len(self.names), dtype=torch.float64)
        self.sumsq = torch.zeros(len(self.names), dtype=torch.float64)

    def add(self, values: Tensor) -> None:
        """values: (n_samples, n_layers) independent samples of every layer's average trace."""
        v = values.detach().to(torch.float64)
        self.count += v.shape[0]
        self.sum += v.sum(0)
        self.sumsq += (v * v).sum(0)

    def mean(self) -> Tensor:
        return self.sum / max(self.count, 1)

    def stderr(self) -> Tensor:
        n = self.count
        if n < 2:
            return torch.full_like(self.sum, math.inf)
        m = self.sum / n
        var = ((self.sumsq - n * m * m) / (n - 1)).clamp_min(0.0)
        return (var / n).sqrt()

    def state_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "count": self.count,
            "sum": self.sum.clone(),
            "sumsq": self.sumsq.clone(),
        }

    def load_state_dict(self, s: Mapping[str, Any]) -> None:
        if list(s["names"]) != self.names:
            raise ValueError("saved estimator state is for other layers: delete the state file")
        self.count = int(s["count"])
        self.sum = s["sum"].clone()
        self.sumsq = s["sumsq"].clone()


class ResidualStats:
    """Per-chunk residual estimates r_k (probe means) beside the chunk's mean Gauss-Newton value g_k.

    The trace is mean(g over images) + mean(r over chunks); its variance adds the residual's spread over
    chunks (data and probes) and twice the covariance of g_k and r_k (the same images made both).
    """

    def __init__(self, n_layers: int) -> None:
        self.count = 0
        self.sum = torch.zeros(n_layers, dtype=torch.float64)
        self.sumsq = torch.zeros(n_layers, dtype=torch.float64)
        self.sum_g = torch.zeros(n_layers, dtype=torch.float64)
        self.sum_gr = torch.zeros(n_layers, dtype=torch.float64)

    def add(self, r: Tensor, g: Tensor) -> None:
        """r, g: (n_layers,) one chunk's residual estimate and mean Gauss-Newton value."""
        r, g = r.detach().double(), g.detach().double()
        self.count += 1
        self.sum += r
        self.sumsq += r * r
        self.sum_g += g
        self.sum_gr += g * r

    def mean(self) -> Tensor:
        return self.sum / max(self.count, 1)

    def variance_of_mean(self) -> Tensor:
        """Var(mean r) + 2 Cov(mean g, mean r), both over chunks (inf below two chunks)."""
        k = self.count
        if k < 2:
            return torch.full_like(self.sum, math.inf)
        mr, mg = self.sum / k, self.sum_g / k
        var = (self.sumsq - k * mr * mr) / (k - 1)
        cov = (self.sum_gr - k * mg * mr) / (k - 1)
        return (var + 2 * cov) / k

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "sum": self.sum.clone(), "sumsq": self.sumsq.clone(),
                "sum_g": self.sum_g.clone(), "sum_gr": self.sum_gr.clone()}

    def load_state_dict(self, s: Mapping[str, Any]) -> None:
        self.count = int(s["count"])
        self.sum, self.sumsq = s["sum"].clone(), s["sumsq"].clone()
        self.sum_g, self.sum_gr = s["sum_g"].clone(), s["sum_gr"].clone()


class ProbeSpread:
    """The spread of probes inside their chunks: a floor under a probe estimate's standard error.

    A chunk's estimate is the mean of its k probes, so its variance over chunks is at least the probes'
    own variance / k. With few chunks the spread of chunk means (one degree of freedom for two chunks) can
    come out far below that by chance, and a trace that is noise would look precise; the pooled within-chunk
    variance gives the floor: Var(mean of n chunk means) >= s_w^2 * sum_c (1 / k_c) / n^2.
    """

    def __init__(self, n_layers: int) -> None:
        self.ss = torch.zeros(n_layers, dtype=torch.float64)  # sum over chunks of squared deviations
        self.dof = 0  # sum over chunks of (k_c - 1)
        self.inv_k = 0.0  # sum over chunks of 1 / k_c
        self.count = 0

    def add(self, est: Tensor) -> None:
        """est: (k, n_layers) one chunk's probe values."""
        v = est.detach().double()
        self.count += 1
        self.inv_k += 1.0 / v.shape[0]
        if v.shape[0] > 1:
            self.ss += ((v - v.mean(0)) ** 2).sum(0)
            self.dof += v.shape[0] - 1

    def variance_of_mean(self) -> Tensor:
        """The floor of Var(mean over chunks) (zero while no chunk had two probes)."""
        if not self.dof:  # dof > 0 only after a chunk of two or more probes
            return torch.zeros_like(self.ss)
        return self.ss / self.dof * self.inv_k / self.count**2

    def floor(self, stderr: Tensor) -> Tensor:
        return torch.maximum(stderr, self.variance_of_mean().sqrt())

    def state_dict(self) -> dict[str, Any]:
        return {"ss": self.ss.clone(), "dof": self.dof, "inv_k": self.inv_k, "count": self.count}

    def load_state_dict(self, s: Mapping[str, Any]) -> None:
        self.ss, self.dof, self.inv_k, self.count = s["ss"].clone(), int(s["dof"]), float(s["inv_k"]), int(s["count"])


def convergence(mean: Tensor, stderr: Tensor, n_params: Sequence[int], rel_tol: float, min_share: float) -> list[bool]:
    """Which layers are done: relative stderr <= rel_tol, or a share of the total trace below min_share.

    The share uses full traces Tr(H_l) = n_l * mean_l (what the sensitivity Omega_l scales with), not
    average traces, so a tiny layer with a large average trace but little weight does not hold up the run.
    """
    full = mean.abs() * torch.tensor(list(n_params), dtype=mean.dtype)
    total = float(full.sum())
    out = []
    for i in range(len(n_params)):
        if not math.isfinite(float(stderr[i])):
            out.append(False)
        elif total > 0 and float(full[i]) < min_share * total:
            out.append(True)
        else:
            m = abs(float(mean[i]))
            out.append(m > 0 and float(stderr[i]) <= rel_tol * m or float(stderr[i]) == 0.0)
    return out
