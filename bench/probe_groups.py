"""The residual's probes on a deep curved net: one probe over all layers, contiguous runs of layers sharing a
probe, or each layer its own (what residual.py does), on a torchvision model with random weights.

For one chunk of random images and labels: the per-probe variance of each curved layer's residual value
v_l . (R v)_l with 1, 4 and 16 runs of layers per probe, relative to per-layer probes (median over layers),
the layers whose probe is exact (no variance), and the seconds per probe.

    .venv/bin/python bench/probe_groups.py [--model convnext_tiny] [--px 96] [--images 4] [--probes 12]

Writes its section of docs/probe_groups.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

import hawq
from hawq.hessian.curvature import inspect_model
from hawq.hessian.residual import blockwise_quadratic_forms, residual_gradients


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="convnext_tiny")
    p.add_argument("--px", type=int, default=96)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--probes", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="docs/probe_groups.md", help="page to update ('' for stdout only)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = torchvision.models.get_model(a.model, weights=None).eval()
    hawq.decompose_attention_(model)
    names = hawq.quantizable_layers(model)
    mods = dict(model.named_modules())
    x, y = torch.randn(a.images, 3, a.px, a.px), torch.randint(0, 1000, (a.images,))
    info = inspect_model(model, [mods[n] for n in names], x[:2], names)
    params = [mods[names[i]].weight for i in info.curved_layers()]
    for q in model.parameters():
        q.requires_grad_(False)
    for q in params:
        q.requires_grad_(True)
    L = len(params)
    var, sec = {}, {}
    for groups in (1, 4, 16, L):
        grads = residual_gradients(model, params, x, y, F.cross_entropy)
        t0 = time.perf_counter()
        est = blockwise_quadratic_forms(grads, params, a.probes, torch.Generator().manual_seed(0), max_groups=groups)
        sec[groups] = (time.perf_counter() - t0) / a.probes
        var[groups] = est.var(0)
    # a layer whose probe is exact (variance ~0: its block's off-diagonal vanishes) is counted, not divided by
    exact = {g: v <= 1e-12 * var[1].clamp_min(1e-300) for g, v in var.items()}
    both = ~exact[L]
    lines = [f"## {a.model}", "",
             f"`.venv/bin/python bench/probe_groups.py --model {a.model} --px {a.px} --images {a.images} --probes "
             f"{a.probes} --threads {a.threads}` ({time.strftime('%Y-%m-%d')}): {L} curved layers.", "",
             f"| probes per layer group | layers exact per probe | variance vs per-layer (median over the "
             f"{int(both.sum())} layers not exact per layer) | s/probe | time vs one probe |",
             "|---|---|---|---|---|"]
    for groups in (1, 4, 16, L):
        rel = statistics.median((var[groups][both] / var[L][both]).tolist()) if both.any() else float("nan")
        label = "each layer" if groups == L else f"{groups} run{'s' if groups > 1 else ''}"
        lines.append(f"| {label} | {int(exact[groups].sum())} | {rel:.3g}x | {sec[groups]:.2f} | "
                     f"{sec[groups] / sec[1]:.1f}x |")
    print("\n".join(lines))
    if a.out:
        write_section(Path(a.out), lines)


HEAD = """# The residual's probes on deep curved nets

Written by `bench/probe_groups.py`, one section per model: torchvision models with random weights, one chunk
of random images and labels; per curved layer the per-probe variance of its residual value v_l . (R v)_l when
one probe covers all layers, 4 or 16 contiguous runs of layers, or each layer alone (what
`hawq.hessian.residual` does), and the seconds per probe (all layers). A layer whose own probe has no variance
(its block R_ll has no off-diagonal part) is counted as exact.
"""


def write_section(path: Path, lines: list[str]) -> None:
    """Replace this model's section of the page (or add it), keeping the others."""
    text = path.read_text() if path.exists() else HEAD
    parts = text.split("\n## ")
    head, sections = parts[0], {p.split("\n", 1)[0]: "## " + p for p in parts[1:]}
    sections[lines[0][3:]] = "\n".join(lines) + "\n"
    path.write_text(head.rstrip("\n") + "\n\n" + "\n".join(sections[k].rstrip("\n") + "\n" for k in sorted(sections)))


if __name__ == "__main__":
    main()
