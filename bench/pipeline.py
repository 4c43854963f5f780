"""End-to-end benchmark of the default job (issue: end-to-end pipeline).

Runs `hawq run` twice in fresh processes on the default task: cold (empty model cache, so the
full-precision model is trained) and warm (cached model), each into its own run folder. Prints wall time
and peak memory of each, the accuracy checks, and whether plan.json and traces.json are byte-identical.

    .venv/bin/python bench/pipeline.py [--work DIR] [--quick] [extra hawq run options...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run_once(out: Path, cache: Path, extra: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one `hawq run` in a child process."""
    env = dict(os.environ, HAWQ_CACHE=str(cache))
    cmd = [sys.executable, "-m", "hawq.cli", "run", "--quiet", "--out", str(out), *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (kB on Linux)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"hawq run failed with exit code {os.waitstatus_to_exitcode(status)}")
    return wall, usage.ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="bench-runs/pipeline")
    ap.add_argument("--quick", action="store_true")
    args, extra = ap.parse_known_args()
    if args.quick:
        extra = ["--quick", *extra]
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    cache = work / "cache"
    cold_s, cold_gb = run_once(work / "cold", cache, extra)
    warm_s, warm_gb = run_once(work / "warm", cache, extra)

    res = json.loads((work / "cold" / "results.json").read_text())
    m = res["models"]
    print(f"machine: {os.cpu_count()} cores; torch threads default")
    print(f"cold run (training included): {cold_s:7.1f} s, peak RSS {cold_gb:.2f} GB   target < 600 s, < 3 GB")
    print(f"warm run (cached fp32 model): {warm_s:7.1f} s, peak RSS {warm_gb:.2f} GB   target < 300 s")
    print("stage wall times (cold):", {k: v["wall_s"] for k, v in res["stages"].items()})
    print(f"full precision top-1: {m['fp32']['top1']:.2f}%")
    for name in sorted(k for k in m if k != "fp32"):
        r = m[name]
        print(f"  {name:9s} {r['size_mb']:.4f} MB  Omega {r['omega']:.4g}  before FT {r['top1_before_ft']:.2f}%"
              f"  after FT {r['top1']:.2f}%")
    if "uniform3" in m:
        gain = m["hawq"]["top1_before_ft"] - m["uniform3"]["top1_before_ft"]
        print(f"HAWQ - uniform 3-bit before fine-tuning: {gain:+.2f} points (target >= +1.00)")
        print(f"  sizes: HAWQ {m['hawq']['size_mb']:.4f} MB, uniform 3-bit {m['uniform3']['size_mb']:.4f} MB")
    gap = m["fp32"]["top1"] - m["hawq"]["top1"]
    print(f"full precision - HAWQ after fine-tuning: {gap:+.2f} points (target <= 0.50)")
    for name in ("plan.json", "traces.json"):
        same = (work / "cold" / name).read_bytes() == (work / "warm" / name).read_bytes()
        print(f"{name} byte-identical between the two runs (same seed): {same}")


if __name__ == "__main__":
    main()
