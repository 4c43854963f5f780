"""A run folder: its artifacts, the config it belongs to, and stage timings in results.json."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from hawq import __version__
from hawq.config import RunConfig
from hawq.io import read_json, write_json


class RunFolder:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

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

    def results(self) -> dict[str, Any]:
        p = self.path("results.json")
        return read_json(p, "results") if p.exists() else {"stages": {}, "models": {}}

    def update_results(self, *, stage: str | None = None, wall_s: float | None = None, **sections: Any) -> None:
        res = self.results()
        res.pop("kind", None)
        res.pop("version", None)
        if stage is not None:
            res.setdefault("stages", {})[stage] = {"wall_s": round(float(wall_s or 0.0), 2)}
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(res.get(key), dict):
                res[key].update(value)
            else:
                res[key] = value
        write_json(self.path("results.json"), "results", res)
