"""A run folder: its artifacts (named here, nowhere else), the config it belongs to, and results.json."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from hawq import __version__
from hawq.artifacts import read_json, write_json
from hawq.config import RunConfig


class RunFolder:
    """The artifacts of a run (README: Artifacts of a run folder), by name."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        r = self.root
        self.config_path = r / "config.json"  # the resolved configuration and its fingerprint
        self.fp32 = r / "fp32.pt"  # full-precision weights
        self.traces = r / "traces.json"  # per-layer Hessian traces
        self.traces_partial = r / "traces.partial.pt"  # running sums of an interrupted estimation
        self.act_traces_partial = r / "act_traces.partial.pt"  # the same for activation traces
        self.diagonals = r / "diagonals.pt"  # curvature diagonals (--sensitivity diag)
        self.sensitivity = r / "sensitivity.json"  # perturbations and Omega per layer and bit width
        self.frontier = r / "frontier.json"  # the Pareto-optimal plans
        self.plan = r / "plan.json"  # the chosen plan and the uniform ones
        self.results = r / "results.json"  # scores, sizes, stage times, the export's check
        self.onnx = r / "model.onnx"  # the exported plan
        self.report = r / "report.md"
        self.figures = r / "figures"

    def qat(self, name: str) -> Path:
        """The fine-tuned checkpoint of plan `name` (hawq, uniform4, ...)."""
        return self.root / "qat" / f"{name}.pt"

    def check_config(self, cfg: RunConfig) -> None:
        """Raise if the folder holds another run, or is a non-empty folder that is not a run at all."""
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"--out {self.root} is a file: choose a folder")
        if self.config_path.exists():
            old = read_json(self.config_path, "config")
            if old.get("fingerprint") != cfg.fingerprint():
                raise ValueError(
                    f"--out {self.root} holds a different run (other model, data, seed or trace settings): "
                    "choose another --out or delete that folder"
                )
        elif self.root.exists() and any(p for p in self.root.iterdir() if not p.name.startswith(".")):
            raise ValueError(f"--out {self.root} is a non-empty folder that is not a hawq run: choose another --out")

    def write_config(self, cfg: RunConfig) -> None:
        payload = cfg.to_dict()
        gpu = cfg.device.startswith("cuda") and torch.cuda.is_available()  # a report may run elsewhere
        payload.update(
            fingerprint=cfg.fingerprint(),
            hawq_version=__version__,
            torch_version=torch.__version__.split("+")[0],
            machine=f"{platform.machine()}, {torch.get_num_threads()} CPU threads"
            + (f", {torch.cuda.get_device_name(cfg.device)}" if gpu else ""),
        )
        write_json(self.config_path, "config", payload)

    def read_config(self) -> RunConfig:
        if not self.config_path.exists():
            raise ValueError(f"{self.root} is not a hawq run folder (no config.json): run `hawq run --out {self.root}`")
        return RunConfig.from_dict(read_json(self.config_path, "config"))

    def read_results(self) -> dict[str, Any]:
        return read_json(self.results, "results") if self.results.exists() else {"stages": {}, "models": {}}

    def update_results(self, *, stage: str | None = None, wall_s: float | None = None, **sections: Any) -> None:
        res = self.read_results()
        res.pop("kind", None)
        res.pop("version", None)
        if stage is not None:
            res.setdefault("stages", {})[stage] = {"wall_s": round(float(wall_s or 0.0), 2)}
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(res.get(key), dict):
                res[key].update(value)
            else:
                res[key] = value
        write_json(self.results, "results", res)
