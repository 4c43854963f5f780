"""End-to-end benchmark of the default job (issues: end-to-end pipeline; the first ten minutes).

Runs `hawq run` in fresh processes on the default task, each into its own run folder: cold (empty model
cache: the bundled full-precision model is used where one matches, else the model is trained), warm (the
cached model), and with `--with-training` a third run with `--retrain` (the model trained from its recipe,
as on a machine without the bundle). Prints wall time and peak memory of each, the time of every stage,
the accuracy checks, and whether plan.json and traces.json are byte-identical.

    .venv/bin/python bench/pipeline.py [--work DIR] [--quick] [--with-training] [extra hawq run options...]
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
    ap.add_argument("--with-training", action="store_true", help="a third run that retrains the fp32 model")
    args, extra = ap.parse_known_args()
    if args.quick:
        extra = ["--quick", *extra]
    work = Path(args.work)
    load0 = os.getloadavg()
    shutil.rmtree(work, ignore_errors=True)
    cache = work / "cache"
    cold_s, cold_gb = run_once(work / "cold", cache, extra)
    warm_s, warm_gb = run_once(work / "warm", cache, extra)
    if args.with_training:
        train_s, train_gb = run_once(work / "retrain", work / "cache-retrain", [*extra, "--retrain"])

    res = json.loads((work / "cold" / "results.json").read_text())
    m = res["models"]
    limits = (90, 90) if args.quick else (360, 180)
    print(f"machine: {os.cpu_count()} cores; torch threads default; load average before: {load0}")
    for name in ("cold", "warm", "retrain") if args.with_training else ("cold", "warm"):
        source = json.loads((work / name / "results.json").read_text())["models"]["fp32"]["source"]
        print(f"full-precision model of the {name} run: {source}")
    print(f"cold run (empty cache):       {cold_s:7.1f} s, peak RSS {cold_gb:.2f} GB   target <= {limits[0]} s")
    print(f"warm run (second run):       {warm_s:7.1f} s, peak RSS {warm_gb:.2f} GB   target <= {limits[1]} s")
    if args.with_training:
        print(f"run with --retrain:           {train_s:7.1f} s, peak RSS {train_gb:.2f} GB")
    for name in ("cold", "warm", "retrain") if args.with_training else ("cold", "warm"):
        stages = json.loads((work / name / "results.json").read_text())["stages"]
        print(f"stage wall times ({name}):", {k: v["wall_s"] for k, v in stages.items()})
    print(f"full precision top-1: {m['fp32']['top1']:.2f}%")
    for name in sorted(k for k in m if k != "fp32"):
        r = m[name]
        tuned = "not fine-tuned" if r.get("ft_skipped") else "after FT"
        print(f"  {name:9s} {r['size_mb']:.4f} MB  Omega {r['omega']:.4g}  before FT {r['top1_before_ft']:.2f}%"
              f"  {tuned} {r['top1']:.2f}%")
    if "uniform3" in m:
        gain = m["hawq"]["top1_before_ft"] - m["uniform3"]["top1_before_ft"]
        errs = (100 - m["hawq"]["top1_before_ft"]) / 100 + (100 - m["uniform3"]["top1_before_ft"]) / 100
        se = 100 * (errs / 10_000) ** 0.5  # worst-case paired test-sampling error on the 10,000 test images
        # (the old target of +1.00 was set before the post-training steps, which lift uniform 3-bit by ~6 points)
        print(f"HAWQ - uniform 3-bit before fine-tuning: {gain:+.2f} points (paired test-sampling error up to "
              f"{se:.2f}: {'significant' if abs(gain) > 2 * se else 'within noise'})")
        print(f"  sizes: HAWQ {m['hawq']['size_mb']:.4f} MB, uniform 3-bit {m['uniform3']['size_mb']:.4f} MB")
    gap = m["fp32"]["top1"] - m["hawq"]["top1"]
    print(f"full precision - HAWQ after fine-tuning: {gap:+.2f} points (target <= 0.50)")
    for name in ("plan.json", "traces.json"):
        same = (work / "cold" / name).read_bytes() == (work / "warm" / name).read_bytes()
        print(f"{name} byte-identical between the two runs (same seed): {same}")


if __name__ == "__main__":
    main()
