"""Versioned JSON artifacts and atomic writes: a killed run never leaves a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

ARTIFACT_VERSION = 1


def writes_here() -> bool:
    """False on every rank but 0 of a torch.distributed run: only rank 0 writes artifacts."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (/proc on Linux).

    Setting and restoring it (the only portable way) is a race with other threads creating files, so
    that is the fallback only.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish(tmp: str, path: Path) -> None:
    """Give the temporary file (mkstemp makes it 0600) the mode a plain open() would, then rename it."""
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, path)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    if not writes_here():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def dumps(obj: Any) -> str:
    """Canonical JSON text: sorted keys, fixed indentation, so equal content gives equal bytes."""
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, kind: str, payload: dict[str, Any]) -> Path:
    """Write {"kind": kind, "version": ..., **payload} atomically."""
    path = Path(path)
    if "kind" in payload or "version" in payload:
        raise ValueError("artifact payloads may not hold 'kind' or 'version' keys")
    _atomic_write_bytes(path, dumps({"kind": kind, "version": ARTIFACT_VERSION, **payload}).encode())
    return path


def read_json(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    """Read an artifact, checking its kind and version; errors say which file to fix or remove."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist: run the stage that writes it first")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}): delete it and rerun") from e
    if not isinstance(data, dict) or data.get("kind") != kind:
        raise ValueError(f"{path} is not a {kind!r} artifact: delete it or point to the right file")
    if data.get("version") != ARTIFACT_VERSION:
        raise ValueError(f"{path} has version {data.get('version')}, this hawq reads {ARTIFACT_VERSION}: rerun")
    return data


def save_torch(path: str | os.PathLike, obj: Any) -> Path:
    """torch.save through a temporary file and a rename."""
    path = Path(path)
    if not writes_here():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_torch(path: str | os.PathLike) -> Any:
    """torch.load with weights_only; a corrupt or foreign file is a ValueError naming the path."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist: check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}): it is corrupt; delete it") from e
