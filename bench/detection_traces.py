"""Detection traces: gn_residual (the focal + smooth-L1 loss's own output Hessian) against plain Hutchinson at
equal wall time, on the detection bench's trained RetinaNet (issue 12, item 3).

For two seeds (the order of the training canvases and the random signs / probes):
  * gn_residual, what `auto` chooses for this loss: Gauss-Newton from the loss's output Hessian (exact for
    this ReLU detector: the residual is zero), to 5% relative standard error on every layer holding >= 1% of
    the total trace, or `--max-images`;
  * hutchinson for the same wall time (the stream of chunks stops when gn_residual's time is spent);
  * the largest relative standard error over the layers holding >= 1% of the total trace, the two seeds'
    Spearman rank correlation, whether the two seeds give the same weight plan at the size of uniform
    3-bit weights (candidates 2/3/4/8, first conv and both output convs at 8), and per layer how far the two
    methods' traces are apart in combined standard errors.
Writes docs/detection_traces.json and a section of docs/detection.md.

    .venv/bin/python bench/detection_traces.py --threads 1   # trains the detector if the cache lacks it
    .venv/bin/python bench/detection_traces.py --quick       # a smoke run on a small set
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import time
import warnings
from pathlib import Path

import torch
from scipy.stats import spearmanr

from hawq.alloc import best_plan, sensitivity_table
from hawq.data.detection_synth import detection_loader, load_detection_split, make_detection_set
from hawq.hessian import TraceResult, estimate_traces
from hawq.tasks.detection import detection_loss_fn, fixed_layers, hessian_batches

_spec = importlib.util.spec_from_file_location("bench_detection", Path(__file__).with_name("detection.py"))
det = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(det)

SECTION = "## Hessian traces: gn_residual against Hutchinson at equal wall time"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-images", type=int, default=None, help="gn_residual's image cap (default: the train set)")
    p.add_argument("--rel-tol", type=float, default=0.05)
    p.add_argument("--out", default="docs/detection.md", help="page whose traces section is (re)written")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    args, rest = p.parse_known_args(argv)
    args.det = det.parse_args(rest + (["--quick"] if args.quick else []))  # the detection bench's set and model
    return args


def stream(train, seed: int, deadline: list[float] | None = None):
    """Chunks of 64 training canvases, reshuffled every epoch; stops at `deadline[0]` (perf_counter) if given."""
    epoch = 0
    while True:
        for xy in hessian_batches(detection_loader(train, 64, shuffle=True, seed=1000 * epoch + seed + 1)):
            if deadline is not None and time.perf_counter() >= deadline[0]:
                return
            yield xy
        epoch += 1


def worst_rel(r: TraceResult) -> tuple[float, str]:
    full = {lt.fqn: abs(lt.trace) * lt.n_params for lt in r.layers}
    total = sum(full.values())
    return max((lt.rel_stderr, lt.fqn) for lt in r.layers if full[lt.fqn] >= 0.01 * total)


def plan_bits(fp32, r: TraceResult, example) -> dict[str, int]:
    traces = {lt.fqn: max(lt.trace, 0.0) for lt in r.layers}
    table = sensitivity_table(fp32, traces, bits=(2, 3, 4, 8), fixed=fixed_layers(fp32), example_input=example,
                              progress=False)
    size = 32 * table.other_params + sum(row.n_params * (row.bits[0] if row.fixed else 3) for row in table.layers)
    return dict(best_plan(table, budget_bytes=size / 8).w_bits)


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    d = a.det
    paths = make_detection_set(Path(d.work) / f"set-{d.n_train}-{d.n_val}-{d.seed}", n_train=d.n_train,
                               n_val=d.n_val, seed=d.seed)
    train, val = load_detection_split(paths, "train"), load_detection_split(paths, "val")
    fp32, train_s = det.full_precision(d, train, progress=not d.quiet)
    loss = detection_loss_fn(fp32)
    cap = a.max_images or len(train)
    runs: dict[str, dict[int, TraceResult]] = {"gn_residual": {}, "hutchinson": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unconverged Hutchinson layers are the point of the table
        for seed in (0, 1):
            runs["gn_residual"][seed] = g = estimate_traces(fp32, stream(train, seed), loss=loss, method="auto",
                                                            rel_tol=a.rel_tol, max_images=cap, seed=seed,
                                                            progress=not d.quiet)
            deadline = [math.inf]

            def timed(seed=seed, deadline=deadline, wall=g.wall_s):
                deadline[0] = time.perf_counter() + wall
                yield from stream(train, seed, deadline)

            runs["hutchinson"][seed] = estimate_traces(fp32, timed(), loss=loss, method="hutchinson", rel_tol=1e-9,
                                                       max_images=None, max_probes=10**9, seed=seed,
                                                       progress=not d.quiet)
    example = val.images[:4]
    rows = {}
    for label, rs in runs.items():
        a0, a1 = ([lt.trace for lt in rs[s].layers] for s in (0, 1))
        rows[label] = {"method": rs[0].method, "reason": rs[0].reason, "notes": list(rs[0].notes),
                       "wall_s": [rs[s].wall_s for s in (0, 1)], "images": [rs[s].n_images for s in (0, 1)],
                       "backward": [rs[s].n_backward for s in (0, 1)],
                       "worst_rel_se": [worst_rel(rs[s]) for s in (0, 1)],
                       "spearman": float(spearmanr(a0, a1).statistic),
                       "same_plan": plan_bits(fp32, rs[0], example) == plan_bits(fp32, rs[1], example),
                       "traces": {s: rs[s].to_dict() for s in (0, 1)}}
    apart = {}
    for i, lt in enumerate(runs["gn_residual"][0].layers):
        h = runs["hutchinson"][0].layers[i]
        apart[lt.fqn] = {"gn_residual": [lt.trace, lt.stderr], "hutchinson": [h.trace, h.stderr],
                         "z": (h.trace - lt.trace) / math.sqrt(lt.stderr**2 + h.stderr**2)}
    out = {"rows": rows, "apart_seed0": apart, "train_s": train_s, "threads": a.threads,
           "load_end": os.getloadavg()[0], "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch "
           f"{torch.__version__}", "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "quick": a.quick, "n_train": d.n_train, "epochs": d.epochs}
    page = Path(a.out)
    page.with_name("detection_traces.json").write_text(json.dumps(out, indent=1))
    write_section(page, render(out, a))


def render(out: dict, a) -> list[str]:
    lines = [SECTION, "",
             f"`.venv/bin/python bench/detection_traces.py --threads {a.threads}{' --quick' if a.quick else ''}` on "
             f"{out['machine']}, {out['finished']} (raw: [detection_traces.json](detection_traces.json)); the "
             f"detection bench's float detector ({out['n_train']} canvases, {out['epochs']} epochs; trained again "
             "on this machine, so not the weights of the table above). gn_residual "
             f"stops at {100 * a.rel_tol:g}% relative standard error on every layer holding >= 1% of the total trace "
             "(or after one pass over the training canvases); Hutchinson (4 probes per chunk of 64 canvases) gets "
             "the same wall time. `worst rel. s.e.` is over those layers, per seed; `same plan`: the two seeds' "
             "weight plans at the size of uniform 3-bit weights (candidates 2/3/4/8) are identical.", "",
             "| method | wall s (seeds 0, 1) | images | backward passes | worst rel. s.e. (layer) | Spearman | "
             "same plan |", "|---|---|---|---|---|---|---|"]
    for label, m in out["rows"].items():
        worst = ", ".join(f"{100 * v:.1f}% ({f})" for v, f in m["worst_rel_se"])
        lines.append(f"| {label} | {m['wall_s'][0]:.0f}, {m['wall_s'][1]:.0f} | {m['images'][0]}, {m['images'][1]} | "
                     f"{m['backward'][0]}, {m['backward'][1]} | {worst} | {m['spearman']:.3f} | "
                     f"{'yes' if m['same_plan'] else 'no'} |")
    lines += ["", "Per layer, seed 0: average trace ± standard error by each method, and their difference in "
              "combined standard errors (z):", "",
              "| layer | gn_residual | Hutchinson | z |", "|---|---:|---:|---:|"]
    for f, v in out["apart_seed0"].items():
        (g, gs), (h, hs) = v["gn_residual"], v["hutchinson"]
        lines.append(f"| {f} | {g:.3e} ± {gs:.1e} | {h:.3e} ± {hs:.1e} | {v['z']:+.2f} |")
    g, h = out["rows"]["gn_residual"], out["rows"]["hutchinson"]
    gw, hw = (max(v for v, _ in m["worst_rel_se"]) for m in (g, h))
    lines += ["", f"In short: in the same time the worst relative standard error is {100 * gw:.1f}% with gn_residual "
              f"and {100 * hw:.1f}% with Hutchinson, i.e. Hutchinson would need about {(hw / gw) ** 2:.0f}x the "
              "time for gn_residual's precision; the two methods' traces agree within "
              f"{max(abs(v['z']) for v in out['apart_seed0'].values()):.1f} combined standard errors on every layer. "
              "`hawq run --task detection` (method auto) now uses gn_residual; the plans of the table above were "
              "made from Hutchinson traces (bench/detection.py asks for it).", "",
              f"Why `auto` chose gn_residual: {g['reason']}.", ""]
    lines += [f"Note: {n}." for n in g["notes"]]
    lines += ["", f"Load average at the end {out['load_end']:.1f} with {out['threads']} torch thread(s); both "
              "methods of a seed ran back to back, so they shared the same load.", ""]
    return lines


def write_section(page: Path, lines: list[str]) -> None:
    """Replace (or append) this bench's section of `page`, keeping everything else."""
    text = page.read_text() if page.exists() else ""
    head, _, rest = text.partition(SECTION)
    tail = ""
    if rest:
        nxt = rest.find("\n## ")
        tail = rest[nxt + 1 :] if nxt >= 0 else ""
    tmp = page.with_suffix(".tmp")
    tmp.write_text(head.rstrip() + "\n\n" + "\n".join(lines) + ("\n" + tail if tail else ""))
    os.replace(tmp, page)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
