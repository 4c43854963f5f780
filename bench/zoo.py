"""Model-zoo benchmark (issue 11 item 5): every torchvision classification family through hawq's stages.

For each model (1000 classes, native resolution, random initial weights, a few random images normalised
like ImageNet images, random labels), in its own subprocess (peak RSS = ru_maxrss of that process):
decompose attention (when hawq has it) -> traces (estimate_traces, method 'auto') -> sensitivity table and
the best plan at the size of uniform 4-bit weights (first/last layer 8-bit) -> quantize_ + forward ->
ONNX export -> onnxruntime top-1 agreement with PyTorch. Each stage that fails records one line and the
next meaningful stage still runs. Rows go to docs/zoo.json (resumable: models already there are skipped
unless --force) and docs/zoo.md is rewritten after every model.

    nice -n 10 .venv/bin/python bench/zoo.py                      # all models, cheapest first
    nice -n 10 .venv/bin/python bench/zoo.py --models resnet18 --force
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
JSON_PATH = DOCS / "zoo.json"
MD_PATH = DOCS / "zoo.md"

# cheapest first, so partial results are useful
MODELS = [
    "resnet18", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x1_0", "mnasnet1_0", "regnet_y_400mf",
    "mobilenet_v2", "efficientnet_b0", "googlenet", "densenet121", "resnet50", "resnet50[default]",
    "resnet50[default-uncertain]",
    "mobilenet_v3_large", "resnext50_32x4d", "vit_b_16", "maxvit_t", "swin_t", "convnext_tiny",
    "wide_resnet50_2", "efficientnet_v2_s", "inception_v3",
]
RESOLUTION = {"inception_v3": 299}  # efficientnet_v2_s: 384 native eval size, 224 used here (see header)
STAGES = ("trace", "plan", "quantize", "export", "onnxruntime")


def _err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def _maxrss_mib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------------------------------ child
def _emit(row: dict, stage: str) -> None:
    """The row so far and the stage starting next, for the parent (kept if the child is killed)."""
    row["stage_running"] = stage
    row["peak_rss_mib"] = _maxrss_mib()
    print("ZOO_ROW " + json.dumps(row), flush=True)


def run_child(key: str, n_images: int, threads: int, seed: int) -> dict:
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1)  # the parent asks for a stack before killing a child over memory
    import torch
    import torchvision

    import hawq
    from hawq.alloc import best_plan, sensitivity_table
    from hawq.alloc.sensitivity import default_fixed
    from hawq.export import export_onnx, verify_onnx
    from hawq.hessian import estimate_traces
    from hawq.pipeline import uniform_size_bytes

    torch.set_num_threads(threads)
    name = key.split("[")[0]
    tag = key[len(name) + 1:-1] if "[" in key else ""
    # "[default]": estimate_traces' defaults; "[default-uncertain]": the same with the last layer's random weights
    # scaled by 1e-3 so every image is uncertain (near-uniform softmax: the costly case of 1000 classes);
    # "[hybrid]" etc.: the method forced (a fallback where 'auto' cannot finish in time)
    default_settings = tag.startswith("default")
    forced = tag if tag and not default_settings else None
    res = RESOLUTION.get(name, 224)
    row: dict = {"model": key, "resolution": res, "images": n_images, "threads": threads, "errors": {},
                 "torch": torch.__version__, "torchvision": torchvision.__version__}
    t_all = time.perf_counter()
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None, num_classes=1000).eval()
    row["params"] = sum(p.numel() for p in model.parameters())
    if tag == "default-uncertain":
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            last.weight.mul_(1e-3)
            last.bias.mul_(1e-3)
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (torch.rand(n_images, 3, res, res, generator=g) - mean) / std
    y = torch.randint(0, 1000, (n_images,), generator=g)

    dec = getattr(hawq, "decompose_attention_", None)
    if dec is None:
        row["attention"] = "decompose_attention_ not in hawq"
    else:
        try:
            swapped = dec(model)
            row["attention"] = f"decomposed {len(swapped)}" if swapped else "none to decompose"
        except Exception as e:  # noqa: BLE001
            row["attention"] = f"failed: {_err(e)}"
    row["n_layers"] = len(hawq.quantizable_layers(model))

    # ---- trace
    _emit(row, "trace")
    traces = None
    t0 = time.perf_counter()
    try:
        if default_settings:
            traces = estimate_traces(model, [(x, y)], progress=False)
        else:
            kw = {"method": forced} if forced else {}
            traces = estimate_traces(model, [(x, y)], max_images=n_images, progress=False, **kw)
        row["trace"] = {
            "method": traces.method, "reason": traces.reason, "notes": list(traces.notes),
            "n_images": traces.n_images, "n_backward": traces.n_backward, "wall_s": traces.wall_s,
            "converged": traces.converged, "n_traced": len(traces.layers),
            "max_rel_stderr": max((lt.rel_stderr for lt in traces.layers), default=float("nan")),
            "n_zero_traces": sum(1 for lt in traces.layers if lt.trace == 0),
            "n_inf_se": sum(1 for lt in traces.layers if not lt.rel_stderr < float("inf")),
            "max_finite_rel_stderr": max((lt.rel_stderr for lt in traces.layers if lt.rel_stderr < float("inf")),
                                         default=float("nan")),
        }
    except Exception as e:  # noqa: BLE001
        row["errors"]["trace"] = _err(e)
    row["trace_stage_s"] = time.perf_counter() - t0
    row["rss_after_trace_mib"] = _maxrss_mib()

    # ---- plan
    _emit(row, "plan")
    plan = None
    if traces is not None:
        try:
            fixed = default_fixed(model, x[:1])
            table = sensitivity_table(model, traces.means(), bits=(2, 3, 4, 8), fixed=fixed, progress=False)
            budget = uniform_size_bytes(table, 4)
            plan = best_plan(table, budget_bytes=budget)
            hist = Counter(plan.w_bits.values())
            row["plan"] = {
                "hist": " ".join(f"{b}b:{hist[b]}" for b in sorted(hist)),
                "size_mb": plan.size_bytes / 2**20, "budget_mb": budget / 2**20,
                "fixed": fixed, "n_table": len(table.layers),
            }
        except Exception as e:  # noqa: BLE001
            row["errors"]["plan"] = _err(e)
    else:
        row["errors"]["plan"] = "skipped: no traces"

    # ---- quantize + forward
    _emit(row, "quantize")
    quantized = False
    if plan is not None:
        try:
            with torch.no_grad():
                ref = model(x).argmax(1)
            hawq.quantize_(model, plan)
            with torch.no_grad():
                out = model(x)
            row["quantize"] = {"finite": bool(torch.isfinite(out).all()),
                               "top1_vs_fp32": float((out.argmax(1) == ref).float().mean())}
            quantized = True
        except Exception as e:  # noqa: BLE001
            row["errors"]["quantize"] = _err(e)
    else:
        row["errors"]["quantize"] = "skipped: no plan"

    # ---- export + onnxruntime
    if quantized:
        with tempfile.TemporaryDirectory(prefix="hawq_zoo_") as tmp:
            path = Path(tmp) / f"{name}.onnx"
            exported = False
            _emit(row, "export")
            t0 = time.perf_counter()
            try:
                hawq.calibrate_(model, [(x, y)])
                rep = export_onnx(model, path, x[:1])
                row["export"] = {"opset": rep.opset, "file_mb": rep.file_size_bytes / 2**20,
                                 "s": time.perf_counter() - t0}
                exported = True
            except Exception as e:  # noqa: BLE001
                row["errors"]["export"] = _err(e)
            if exported:
                _emit(row, "onnxruntime")
                try:
                    ver = verify_onnx(path, model, [(x[i:i + 1], y[i:i + 1]) for i in range(n_images)],
                                      min_agreement=0.0)
                    row["onnxruntime"] = {"top1_agreement": ver.top1_agreement, "max_abs_diff": ver.max_abs_diff}
                    if ver.top1_agreement < 1.0:
                        row["errors"]["onnxruntime"] = (f"top-1 agreement {100 * ver.top1_agreement:.0f}% "
                                                        f"(max |logit diff| {ver.max_abs_diff:.3g})")
                except Exception as e:  # noqa: BLE001
                    row["errors"]["onnxruntime"] = _err(e)
            else:
                row["errors"]["onnxruntime"] = "skipped: no ONNX file"
    else:
        row["errors"]["export"] = row["errors"]["onnxruntime"] = "skipped: no quantized model"
    row["row_s"] = time.perf_counter() - t_all
    row["peak_rss_mib"] = _maxrss_mib()
    row.pop("stage_running", None)
    return row


# ------------------------------------------------------------------------------------------------ parent
def _load() -> dict:
    if JSON_PATH.exists():
        return json.loads(JSON_PATH.read_text())
    return {"rows": {}}


def _save(db: dict) -> None:
    tmp = JSON_PATH.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(db, indent=1, sort_keys=True))
    os.replace(tmp, JSON_PATH)
    tmp = MD_PATH.with_suffix(".md.tmp")
    tmp.write_text(render(db))
    os.replace(tmp, MD_PATH)


def _first_error(row: dict) -> str | None:
    for s in STAGES:
        e = row.get("errors", {}).get(s)
        if e and not e.startswith("skipped"):
            return s
    return None


def _cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render(db: dict) -> str:
    meta = db.get("meta", {})
    order = {k: i for i, k in enumerate(MODELS)}
    rows = [db["rows"][k] for k in sorted(db["rows"], key=lambda k: (order.get(k.split("[")[0], 99), k))]
    out = ["# Model zoo: torchvision classifiers through hawq", ""]
    out += [
        f"Generated by `{meta.get('command', 'bench/zoo.py')}` (bench/zoo.py), last update "
        f"{meta.get('date', '?')}.",
        "",
        f"Machine: {meta.get('machine', '?')}. {meta.get('load', '')}",
        "",
        "Settings: torchvision `get_model(name, weights=None)` (random initial weights, nothing downloaded), "
        "1000 classes, native resolution (224 px; inception_v3 299 px; efficientnet_v2_s at 224 px, not its "
        "384 px native eval size), a few random images `(U[0,1) - mean) / std` with ImageNet mean/std and "
        "random labels in 0..999 (seed 0), one subprocess per model (peak memory = `ru_maxrss` of that "
        "process: model, traces, plan, quantized forward, ONNX export and onnxruntime together), "
        f"`torch.set_num_threads({meta.get('threads', 1)})`, `nice -n 10`. `hawq.decompose_attention_` is "
        "applied to every model before anything else (it only changes models with attention).",
        "",
        "Traces: `estimate_traces(model, [(x, y)], max_images=N, progress=False)`, method `auto`, default "
        "`rel_tol` 0.05. With N = 4 images the estimate does **not** converge (expected: per-image "
        "contributions are heavy-tailed and 4 images cannot reach 5% relative standard error); the column "
        "`max rel. SE` is the largest relative standard error over the traced layers. The `resnet50[default]` "
        "row calls `estimate_traces(model, [(x, y)])` with every default (max_images 4096, chunk_size 64, "
        "...), only the data limited to its images. `bwd/img` = `n_backward / n_images` (backward vectors "
        "per image); `s/img` = trace stage wall time / images.",
        "",
        "Plan: `sensitivity_table(model, traces.means(), bits=(2, 3, 4, 8), fixed=default_fixed(model, x))` "
        "(first and last layer 8-bit, found from a forward), `best_plan(table, budget_bytes="
        "uniform_size_bytes(table, 4))` (the size of uniform 4-bit weights), weights only. Then "
        "`hawq.quantize_(model, plan)` and a forward (`q=fp32` is the quantized model's top-1 agreement "
        "with the float model on the images, informative only with random weights), `calibrate_`, "
        "`export_onnx` and `verify_onnx` (onnxruntime top-1 agreement with PyTorch, per image).",
        "",
        "| model | px | params | attention | trace method | why (reason; notes) | images | bwd/img | s/img "
        "| max rel. SE | plan (w bits) | plan MB / budget MB | quantize fwd | ONNX | ort top-1 agree | "
        "peak RSS | row s | failures |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    n_pass = 0
    fails: dict[str, list[str]] = {}
    for r in rows:
        err = r.get("errors", {})
        t = r.get("trace")
        p = r.get("plan")
        q = r.get("quantize")
        ex = r.get("export")
        ort = r.get("onnxruntime")
        real = {s: e for s, e in err.items() if not e.startswith("skipped")}
        if "timeout" in err or "crash" in err:
            real = {k: v for k, v in err.items()}
        if not real and all(r.get(s) for s in STAGES):
            n_pass += 1
        for s, e in real.items():
            fails.setdefault(s, []).append(f"{r['model']} ({e})")
        why = ""
        if t:
            core = t["reason"].removeprefix("curved: ")
            notes = [n.replace(f"({core})", "(as above)") if core and core in n else n for n in t["notes"]]
            why = t["reason"] + ("; " + "; ".join(notes) if notes else "")
        bwd = f"{t['n_backward'] / max(t['n_images'], 1):.1f}" if t else "-"
        spi = f"{r['trace_stage_s'] / max(t['n_images'], 1):.1f}" if t else "-"
        se = f"{t['max_rel_stderr']:.2f}" if t else "-"
        if t and t.get("n_inf_se"):
            se = f"inf on {t['n_inf_se']} of {t['n_traced']} (one chunk); finite max {t['max_finite_rel_stderr']:.2f}"
        out.append("| " + " | ".join(_cell(c) for c in [
            r["model"], r.get("resolution", ""), f"{r.get('params', 0) / 1e6:.1f}M", r.get("attention", "-"),
            t["method"] if t else "-", why or "-", t["n_images"] if t else r.get("images", "-"), bwd, spi, se,
            p["hist"] if p else "-", f"{p['size_mb']:.2f} / {p['budget_mb']:.2f}" if p else "-",
            (f"ok, q=fp32 {100 * q['top1_vs_fp32']:.0f}%" + ("" if q["finite"] else ", NON-FINITE")) if q else "-",
            f"ok, opset {ex['opset']}, {ex['file_mb']:.1f} MB" if ex else "-",
            f"{100 * ort['top1_agreement']:.0f}% (max diff {ort['max_abs_diff']:.2g})" if ort else "-",
            f"{r['peak_rss_mib'] / 1024:.2f} GiB" if r.get("peak_rss_mib") else "-",
            f"{r['row_s']:.0f}" if r.get("row_s") else "-",
            "; ".join(f"{s}: {e}" for s, e in err.items()) or "none",
        ]) + " |")
    out += ["", f"**Summary: {n_pass} of {len(rows)} rows pass every stage** "
                f"(attention, trace, plan, quantize forward, ONNX export, onnxruntime agreement)."]
    if fails:
        out.append("")
        for s, who in fails.items():
            out.append(f"- {s} fails on {len(who)}: " + "; ".join(who))
    def _all_zero(t: dict) -> bool:
        if t.get("n_zero_traces") is not None:
            return t["n_zero_traces"] == t["n_traced"]
        return t["n_backward"] == t["n_images"] and t.get("n_inf_se") == t["n_traced"]  # rows before the field

    zero = [r["model"] for r in rows if r.get("trace") and r["trace"].get("n_traced") and _all_zero(r["trace"])]
    two = [r["model"] for r in rows if r.get("images") == 2]
    out += ["", "Notes:", ""]
    if two:
        out.append(f"- Run with `--images 2` (trace stage too slow at 4 images on this shared machine): "
                   f"{', '.join(two)}. {db.get('meta', {}).get('n2_why', '')}")
    out.append("- `inf` relative standard error: with `gn_residual` the residual term's variance is estimated "
               "from per-chunk means, and 4 (or 2) images are a single chunk (default chunk_size 64), so the "
               "standard error of every curved layer is infinite until a second chunk; `finite max` is the "
               "largest over the other layers. A layer whose trace is exactly 0 also has an infinite relative "
               "error.")
    if zero:
        out.append(f"- All traces exactly 0 ({', '.join(zero)}): with random initial weights these models' "
                   "logits are huge (inception_v3: |logit| ~ 1e12), the softmax is exactly one-hot in float64, "
                   "every image is 'confident' (1 backward vector) and the Gauss-Newton (= Hessian) trace of "
                   "the loss is 0 on every layer; the plan is then uninformative (free layers at 2 bits, below "
                   "the budget) and the logit differences of onnxruntime are large in absolute terms only.")
    idle = [r["model"] for r in rows if r.get("trace") and any("never called" in n for n in r["trace"]["notes"])]
    head0 = [f"{r['model']} ({r['trace']['n_zero_traces']} of {r['trace']['n_traced']})" for r in rows
             if r.get("trace") and r["model"].startswith("vit_b_16") and r["trace"].get("n_zero_traces")]
    if head0:
        out.append(f"- Traces exactly 0 on every layer but the head ({', '.join(head0)}): torchvision "
                   "initialises ViT's classification head to zero, so with `weights=None` the loss does not "
                   "depend on any earlier weight (gradient and Hessian of those layers exactly 0); the logits "
                   "are the zero bias, every image is uncertain (12 vectors). Correct, but the plan carries "
                   "no information for such a model.")
    if idle:
        out.append(f"- Layers never called in eval mode (auxiliary heads: {', '.join(idle)}) are left out of the "
                   "traces and so of the sensitivity table; the table counts their parameters as other "
                   "parameters at 32 bits, so the budget and the plan size include them, while the ONNX file "
                   "(traced in eval mode) leaves them out: hence a plan size far above the file size.")
    out.append("- `q=fp32` (quantized vs float top-1 on the same images) is only a sanity number: with random "
               "weights near-tied logits flip easily.")
    remaining = [k for k in MODELS if k not in db["rows"]]
    only_forced = [k for k in remaining if any(j.startswith(k + "[") for j in db["rows"])]
    never = [k for k in remaining if k not in only_forced]
    if only_forced:
        out += ["", "Run only with a forced method (`[hybrid]` rows), not with `auto`: " + ", ".join(only_forced) + "."]
    if never:
        out += ["", "Not run (time ran out): " + ", ".join(never) + "."]
    for key, what in (("resnet50[default]", "random initial weights (every image confident here)"),
                      ("resnet50[default-uncertain]", "random weights with the last layer scaled by 1e-3, so "
                       "the softmax is near-uniform and every image is uncertain (the costly case)")):
        r = db["rows"].get(key, {})
        d = r.get("trace")
        if d:
            out += ["", f"**resnet50 at 1000 classes, 224 px, default `estimate_traces` settings, {what}** "
                        f"(`{key}`): {d['n_backward'] / d['n_images']:.1f} backward passes per image, "
                        f"{r['trace_stage_s'] / d['n_images']:.1f} s per image ({d['n_images']} images, method "
                        f"{d['method']}), peak RSS of the whole row {r['peak_rss_mib'] / 1024:.2f} GiB (after the "
                        f"trace stage {r['rss_after_trace_mib'] / 1024:.2f} GiB; machine: 24 GiB)."]
    return "\n".join(out) + "\n"


def _machine() -> str:
    cores = os.cpu_count()
    try:
        mem = [ln for ln in open("/proc/meminfo") if ln.startswith("MemTotal")][0].split()[1]
        mem = f"{int(mem) / 2**20:.0f} GiB"
    except Exception:  # noqa: BLE001
        mem = "?"
    cpu = platform.processor() or platform.machine()
    return f"{cores} CPU cores ({cpu}), {mem} RAM, no GPU used, shared with other engineers' jobs"


def _load_line() -> str:
    try:
        la = open("/proc/loadavg").read().split()[:3]
        return f"Load average when the last row started: {' '.join(la)} (on {os.cpu_count()} cores)."
    except Exception:  # noqa: BLE001
        return ""


def _rss_kib(pid: int) -> int:
    try:
        for ln in open(f"/proc/{pid}/status"):
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1])
    except OSError:
        pass
    return 0


def _run_watched(args: list[str], key: str, a) -> dict:
    """Run one child; kill it past --timeout or past --max-rss-gib (the machine is shared); the last row
    it printed (stages done so far) is kept, with the reason it was stopped."""
    import signal

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(args, stdout=out, stderr=err, text=True, cwd=ROOT)
        t0, peak, stopped = time.perf_counter(), 0, None
        while p.poll() is None:
            time.sleep(1.0)
            peak = max(peak, _rss_kib(p.pid))
            if peak > a.max_rss_gib * 2**20:
                stopped = f"killed: RSS {peak / 2**20:.1f} GiB > --max-rss-gib {a.max_rss_gib:g}"
            elif time.perf_counter() - t0 > a.timeout:
                stopped = f"killed: no result within {a.timeout:.0f} s (whole row)"
            if stopped:
                p.send_signal(signal.SIGUSR1)  # faulthandler: where it was
                time.sleep(2)
                p.kill()
                p.wait()
                break
        out.seek(0)
        err.seek(0)
        lines = [ln for ln in out.read().splitlines() if ln.startswith("ZOO_ROW ")]
        errtext = err.read()
    row = json.loads(lines[-1][len("ZOO_ROW "):]) if lines else {"model": key, "images": a.images, "errors": {}}
    complete = bool(lines) and "stage_running" not in row  # the final row came out before the kill
    if (stopped or p.returncode != 0) and not complete:
        stage = row.pop("stage_running", None) or "start"
        why = stopped or f"exit {p.returncode}: " + ((errtext.strip().splitlines() or [""])[-1])[:200]
        row["errors"][stage] = f"{why} (during {stage})"
        for s in STAGES[STAGES.index(stage) + 1:] if stage in STAGES else STAGES:
            row["errors"].setdefault(s, "skipped: row stopped")
        stack = [ln for ln in errtext.splitlines() if ln.startswith(("  File", "Thread", "Current thread"))]
        row["stack"] = stack[:40]
        row["peak_rss_mib"] = max(row.get("peak_rss_mib", 0), peak / 1024)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=None, help="subset (default: all, cheapest first)")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-rss-gib", type=float, default=10.0, help="kill a child above this RSS (shared machine)")
    ap.add_argument("--force", action="store_true", help="rerun models already in docs/zoo.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--render", action="store_true", help="only rewrite docs/zoo.md from docs/zoo.json")
    ap.add_argument("--json", default=None, help="side file (default docs/zoo.json); another file, e.g. for a "
                    "second runner, is merged in by --merge")
    ap.add_argument("--merge", nargs="*", default=None, help="JSON side files whose rows are added to docs/zoo.json")
    a = ap.parse_args(argv)
    global JSON_PATH, MD_PATH
    if a.merge is not None:
        db = _load()
        for f in a.merge:
            other = json.loads(Path(f).read_text())
            db["rows"].update(other["rows"])
        _save(db)
        return 0
    if a.json:
        JSON_PATH = Path(a.json).resolve()
        MD_PATH = JSON_PATH.with_suffix(".md")
    if a.child:
        row = run_child(a.child, a.images, a.threads, a.seed)
        print("ZOO_ROW " + json.dumps(row), flush=True)
        return 0
    db = _load()
    if a.render:
        _save(db)
        return 0
    models = a.models or MODELS
    cmd = "nice -n 10 .venv/bin/python bench/zoo.py" + "".join(f" {x}" for x in (argv or sys.argv[1:]))
    for key in models:
        if key in db["rows"] and not a.force:
            print(f"[zoo] {key}: in {JSON_PATH.name}, skipped (--force reruns)", flush=True)
            continue
        db.setdefault("meta", {}).update(command=cmd, machine=_machine(), load=_load_line(), threads=a.threads,
                                         date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
        print(f"[zoo] {key}: start ({_load_line()})", flush=True)
        t0 = time.perf_counter()
        args = [sys.executable, str(Path(__file__).resolve()), "--child", key, "--images", str(a.images),
                "--threads", str(a.threads), "--seed", str(a.seed)]
        row = _run_watched(args, key, a)
        row["subprocess_s"] = time.perf_counter() - t0
        db["rows"][key] = row
        _save(db)
        print(f"[zoo] {key}: done in {row['subprocess_s']:.0f} s; errors: {row['errors'] or 'none'}", flush=True)
    _save(db)
    return 0


if __name__ == "__main__":
    sys.exit(main())
