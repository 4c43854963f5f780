"""The state of one estimation: running sums, counters, history and RNG (what `state_path` holds)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from torch import Tensor

from hawq.artifacts import load_torch, save_torch
from hawq.hessian.persample import ChunkPlan
from hawq.hessian.result import LayerTrace, ProbeSpread, ResidualStats, RunningStats, TraceResult, convergence


class EstimationRun:
    """Running sums, counters, history and RNG state of one estimation (what `state_path` holds)."""

    def __init__(self, names, n_params, seed, diagonal, params, activations: bool = False,
                 curved: tuple[int, ...] = (), plan: ChunkPlan | None = None) -> None:
        self.names, self.n_params = list(names), list(n_params)
        self.activations = activations
        self.curved = tuple(curved)  # gn_residual: the layers whose residual is probed
        self.loss_gn = False  # gn_residual: Gauss-Newton from the loss's own output Hessian (not softmax's)
        self.plan = plan or ChunkPlan()
        self.stats = RunningStats(names)
        self.residual = ResidualStats(len(self.names))
        self.spread = ProbeSpread(len(self.names))  # hutchinson: probes inside chunks (a floor under stderr)
        self.residual_spread = ProbeSpread(len(self.names))  # gn_residual: the same for the residual probes
        self.images = 0
        self.n_backward = 0
        self.n_probes = 0
        self.history: dict[str, list[list[float]]] = {n: [] for n in names}
        self.gen = torch.Generator().manual_seed(seed)
        self.diag_sums: list[Tensor] | None = (
            [torch.zeros(p.shape, dtype=torch.float64) for p in params] if diagonal else None
        )

    def step(self, model, modules, method, x, y, loss_fn, n_probes) -> None:
        """One chunk by `method`'s step (hessian/steps/), then the counters and the history."""
        from hawq.hessian.methods import BY_NAME
        from hawq.hessian.steps import activation_traces as activations

        (activations.step if self.activations else BY_NAME[method].step)(
            self, model, modules, method, x, y, loss_fn, n_probes
        )
        self.images += x.shape[0]
        mean, se = self.mean(), self.stderr()
        if self.stats.count >= 2:
            for i, n in enumerate(self.names):
                if math.isfinite(float(se[i])):  # gn_residual: no error bar until two chunks of probes
                    self.history[n].append([float(self.images), float(mean[i]), float(se[i])])

    def mean(self) -> Tensor:
        """Per-layer average traces: the Gauss-Newton mean plus the probed residual (gn_residual)."""
        return self.stats.mean() + self.residual.mean() if self.residual.count else self.stats.mean()

    def stderr(self) -> Tensor:
        se = self.spread.floor(self.stats.stderr())  # the floor is zero where no chunk had two probes
        if not self.residual.count or not self.curved:
            return se
        extra = torch.zeros_like(se)
        idx = list(self.curved)
        floor = self.residual_spread.variance_of_mean()
        # proved layers are never probed: GN error only
        extra[idx] = torch.maximum(self.residual.variance_of_mean(), floor)[idx]
        return (se * se + extra).clamp_min(0.0).sqrt()

    def done(self, rel_tol: float, min_share: float) -> list[bool]:
        return convergence(self.mean(), self.stderr(), self.n_params, rel_tol, min_share)

    def result(self, method, rel_tol, min_share, wall_s, notes, reason: str = "") -> TraceResult:
        mean, se = self.mean(), self.stderr()
        done = self.done(rel_tol, min_share)
        n = self.n_probes if method == "hutchinson" and not self.activations else self.stats.count
        layers = tuple(
            LayerTrace(name, self.n_params[i], float(mean[i]), float(se[i]), n, done[i])
            for i, name in enumerate(self.names)
        )
        diagonals = None
        if self.diag_sums is not None:
            diagonals = {name: (d / max(self.images, 1)).float() for name, d in zip(self.names, self.diag_sums)}
        return TraceResult(method, layers, self.images, self.n_backward, wall_s, self.history, tuple(notes), reason,
                           diagonals)

    def save(self, path, key: str) -> None:
        save_torch(
            path,
            {
                "key": key,
                "stats": self.stats.state_dict(),
                "images": self.images,
                "n_backward": self.n_backward,
                "n_probes": self.n_probes,
                "history": self.history,
                "gen": self.gen.get_state(),
                "diag_sums": self.diag_sums,
                "residual": self.residual.state_dict(),
                "spread": self.spread.state_dict(),
                "residual_spread": self.residual_spread.state_dict(),
            },
        )

    def maybe_resume(self, path, key: str) -> None:
        if path is None or not Path(path).exists():
            return
        s = load_torch(path)
        if not isinstance(s, dict) or s.get("key") != key:
            warnings.warn(
                f"{path} holds the state of another estimation (weights or settings differ): starting afresh",
                stacklevel=3,
            )
            return
        self.stats.load_state_dict(s["stats"])
        self.images, self.n_backward, self.n_probes = (
            int(s["images"]),
            int(s["n_backward"]),
            int(s["n_probes"]),
        )
        self.history = {k: [list(r) for r in v] for k, v in s["history"].items()}
        self.gen.set_state(s["gen"])
        if s.get("residual") is not None:
            self.residual.load_state_dict(s["residual"])
        if s.get("spread") is not None:
            self.spread.load_state_dict(s["spread"])
            self.residual_spread.load_state_dict(s["residual_spread"])
        if s.get("diag_sums") is not None:
            self.diag_sums = [d.clone() for d in s["diag_sums"]]
