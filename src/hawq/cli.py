"""Command line: argument parsing only; the work is in hawq.pipeline.

    hawq run [--out DIR] [--quick] ...     every stage
    hawq train | trace | allocate | finetune | evaluate | report --out DIR
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from hawq.config import TRACE_METHODS, RunConfig
from hawq.tasks import dataset_names, task_defaults, task_names


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2
        cmd = self.prog.split()[-1]
        if cmd == "hawq":  # the top parser reports unknown flags of every command: name the command given
            given = [a for a in getattr(self, "given", sys.argv[1:]) if a in getattr(self, "commands", ())]
            cmd = given[0] if given else ""
        print(f"hawq: error: {message} (see `{' '.join(['hawq', cmd] if cmd else ['hawq'])} --help`)",
              file=sys.stderr)
        raise SystemExit(2)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="run", help="run folder (default: ./run)")
    p.add_argument("--quiet", action="store_true", default=False, help="no progress bars or stage messages")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch (default: torch's; 1 is faster on a machine shared with other jobs)")


def _per_task(key: str, what: str = "") -> str:
    """Help text of a per-task default, from the tasks' own defaults: 'default: 3 (detection: 16)'."""
    values = [(t, task_defaults(t).get(key)) for t in task_names()]
    values = [(t, v) for t, v in values if v is not None]
    if not values:
        return ""
    (_, first), rest = values[0], values[1:]
    others = "; ".join(f"{t}: {v}" for t, v in rest)
    return f"{what}default: {first}" + (f" ({others})" if others else "")


def _run_options(p: argparse.ArgumentParser) -> None:
    d = RunConfig()
    g = p.add_argument_group("task")
    g.add_argument("--recipe", default=None,
                   help="a recipe JSON (configs/*.json): its settings are the defaults, the command line wins")
    g.add_argument("--task", choices=task_names(), default=d.task)
    g.add_argument("--model", default=None,
                   help=f"registered model name ({_per_task('model')}), torchvision:NAME "
                        "(any torchvision classification model) or path/to/file.py:function (your own builder)")
    g.add_argument("--dataset", default=None,
                   help=f"one of {', '.join(dataset_names())} (default: the task's first, fashion_mnist)")
    g.add_argument("--data-dir", default=None, help="folder with the data files (default: Debian package folder)")
    g.add_argument("--download", action="store_true", help="download the data set if it is not found")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--quick", action="store_true",
                   help="smoke run on a few hundred images (under 90 s; the full run's model when cached or bundled)")
    g.add_argument("--device", default=d.device, help="cpu (default) or cuda[:N]")
    g = p.add_argument_group("full-precision model")
    g.add_argument("--checkpoint", default=None, help="full-precision weights to use instead of training")
    g.add_argument("--retrain", action="store_true",
                   help="train the full-precision model even when the cache or hawq's bundled models hold it")
    g.add_argument("--weights", default=None, help="local pretrained weights for the model's constructor")
    g.add_argument("--image-size", type=int, default=None, help="ImageNet/COCO input size (default: the model's)")
    g.add_argument("--num-classes", type=int, default=None, help="default: from the data set")
    g.add_argument("--epochs", type=int, default=None, help=_per_task("epochs"))
    g.add_argument("--batch-size", type=int, default=None, help=_per_task("batch_size"))
    g.add_argument("--lr", type=float, default=None, help=_per_task("lr"))
    g = p.add_argument_group("Hessian traces")
    g.add_argument("--trace-method", choices=TRACE_METHODS, default=d.trace_method)
    g.add_argument("--trace-rel-tol", type=float, default=d.trace_rel_tol,
                   help="target relative standard error of every layer's trace (default 0.05)")
    g.add_argument("--trace-max-images", type=int, default=None, help=_per_task("trace_max_images"))
    g.add_argument("--trace-chunk", type=int, default=d.trace_chunk,
                   help=f"images per per-sample backward pass (default {d.trace_chunk}; cut further to fit memory)")
    _alloc_options(p)
    _ft_options(p)


def _default(value):
    return value


def _alloc_options(p: argparse.ArgumentParser, with_defaults: bool = True) -> None:
    d = RunConfig()
    keep = _default if with_defaults else (lambda _: argparse.SUPPRESS)
    g = p.add_argument_group("allocation")
    g.add_argument("--bits", type=int, nargs="+", default=keep(list(d.w_bits)), help="candidate weight bit widths")
    g.add_argument("--a-bits", type=int, default=keep(None), help="activation bits for every layer (default: float)")
    g.add_argument("--a-bits-options", type=int, nargs="+", default=keep(()),
                   help="allocate activation bits too, from these widths (e.g. 4 8), by activation Hessian traces")
    g.add_argument("--budget-gbops", type=float, default=keep(None),
                   help="BOPs budget in 1e9 bit operations per image (with activation bits)")
    g.add_argument("--quantize-first-last", action="store_true", default=keep(False),
                   help="let the allocator choose the first and last layers' bits (default: 8 bits)")
    b = g.add_mutually_exclusive_group()
    b.add_argument("--budget-mb", type=float, default=keep(None), help="model size budget in MB (2^20 bytes)")
    b.add_argument("--compression", type=float, default=keep(None), help="budget as fp32 size / compression")
    b.add_argument("--budget-bits", type=float, default=keep(d.budget_bits),
                   help="budget as the size of uniform weights at this many bits (default 3)")
    g.add_argument("--sensitivity", choices=("trace", "diag"), default=keep(d.sensitivity))
    g.add_argument("--baselines", type=int, nargs="*", default=keep(list(d.baselines)),
                   help="uniform bit widths fine-tuned for comparison (default 8 4 3)")


def _ft_options(p: argparse.ArgumentParser, with_defaults: bool = True) -> None:
    keep = _default if with_defaults else (lambda _: argparse.SUPPRESS)
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--ft-images", type=int, default=keep(None),
                   help=_per_task("ft_images", "images of quantization-aware fine-tuning; "))
    g.add_argument("--ft-lr", type=float, default=keep(None), help=_per_task("ft_lr"))
    g.add_argument("--distill", action="store_true", default=keep(False), help="distil from the full-precision model")
    g.add_argument("--ft-skip-within", type=float, default=keep(0.2), metavar="POINTS",
                   help="a plan scoring within POINTS of full precision after the post-training steps is not "
                        "fine-tuned (default 0.2; negative: fine-tune every plan)")
    g.add_argument("--weight-range", choices=("mse", "max"), default=keep("mse"),
                   help="weight scale per channel: clipped to minimise ||Q(W)-W||^2 (mse, default) or max")
    g.add_argument("--bn-images", type=int, default=keep(4096),
                   help="re-estimate batch-norm statistics of the quantized model on this many training images "
                        "before evaluation and fine-tuning (default 4096; 0: keep the float statistics)")
    g.add_argument("--act-range", choices=("minmax", "percentile", "mse"), default=keep("mse"),
                   help="activation ranges: error-minimising clip of [min, max] (mse, default), 0.01%%/99.99%% "
                        "percentiles, or min/max")


ALLOC_KEYS = ("bits", "a_bits", "quantize_first_last", "budget_mb", "compression", "budget_bits",
              "sensitivity", "baselines")
FT_KEYS = ("ft_images", "ft_lr", "distill", "ft_skip_within", "weight_range", "bn_images", "act_range")


def _to_config_kwargs(args: argparse.Namespace) -> dict:
    drop = ("cmd", "out", "quiet", "threads", "bits", "quantize_first_last", "recipe")
    kw = {k: v for k, v in vars(args).items() if k not in drop}
    if hasattr(args, "bits"):
        kw["w_bits"] = tuple(args.bits)
    if hasattr(args, "quantize_first_last"):
        kw["keep_first_last"] = not args.quantize_first_last
    budget_keys = ("budget_mb", "compression", "budget_bits")
    if args.cmd == "allocate" and any(k in kw for k in budget_keys):  # a new budget replaces the old one
        kw = {"budget_mb": None, "compression": None, "budget_bits": 3.0, **kw}
    for key in ("baselines", "a_bits_options"):
        if key in kw:
            kw[key] = tuple(kw[key])
    return kw


def load_recipe(path: str) -> dict:
    """A recipe: {"kind": "hawq_recipe", "config": {RunConfig fields}, "paper": {...}}."""
    import json
    from dataclasses import fields

    try:
        with open(path) as f:
            recipe = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"recipe {path} cannot be read ({e}): pass a configs/*.json file") from e
    if not isinstance(recipe, dict) or recipe.get("kind") != "hawq_recipe" or not isinstance(recipe.get("config"),
                                                                                          dict):
        raise ValueError(f"{path} is not a hawq recipe (kind 'hawq_recipe' with a 'config' object)")
    known = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(recipe["config"]) - known)
    if unknown:
        raise ValueError(f"recipe {path} sets unknown options {unknown}: remove them")
    return recipe


def _explicit_keys(argv: Sequence[str]) -> set[str]:
    """Config keys named on the command line (so that they override a recipe)."""
    keys = set()
    for tok in argv:
        if tok.startswith("--"):
            key = tok[2:].split("=", 1)[0].replace("-", "_")
            keys.add({"bits": "w_bits", "quantize_first_last": "keep_first_last"}.get(key, key))
    return keys


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hawq", description="Hessian-aware mixed-precision quantization (HAWQ-V2)")
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    p = sub.add_parser("run", help="every stage: train, trace, allocate, fine-tune, report")
    _common(p)
    _run_options(p)
    p = sub.add_parser("train", help="train (or load) the full-precision model")
    _common(p)
    _run_options(p)
    for name, help_ in (("trace", "estimate per-layer Hessian traces"), ("report", "write report.md and figures"),
                        ("evaluate", "evaluate the fine-tuned models again"),
                        ("export", "the fine-tuned plan as ONNX (INT8/INT4/INT2, bit-packed 3/5/6/7), checked")):
        _common(sub.add_parser(name, help=help_))
    # stage commands change only the options given on their command line
    p = sub.add_parser("allocate", help="sensitivity, Pareto frontier and the best plan under the budget",
                       argument_default=argparse.SUPPRESS)
    _common(p)
    _alloc_options(p, with_defaults=False)
    p = sub.add_parser("finetune", help="quantization-aware fine-tuning of the plan and the uniform baselines",
                       argument_default=argparse.SUPPRESS)
    _common(p)
    _ft_options(p, with_defaults=False)
    parser.commands = tuple(sub.choices)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.given = list(sys.argv[1:] if argv is None else argv)  # for the error line's command name
    args = parser.parse_args(argv)
    import torch

    from hawq import pipeline  # imported late: `hawq --help` stays fast
    from hawq.distributed import cleanup, init_from_env, is_main

    progress = not args.quiet
    if args.threads is not None:
        if args.threads < 1:
            print("hawq: error: --threads must be at least 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun: join the process group
            requested = getattr(args, "device", None) or "cpu"
            info = init_from_env("cuda" if requested.startswith("cuda") else "cpu")
            if getattr(args, "device", None) is not None:
                args.device = info.device
            progress = progress and is_main()
        return _dispatch(args, argv, pipeline, progress)
    except ValueError as e:
        print(f"hawq: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hawq: interrupted; finished artifacts are kept, rerun the same command to continue", file=sys.stderr)
        return 130
    finally:
        cleanup()


def _dispatch(args: argparse.Namespace, argv: Sequence[str] | None, pipeline, progress: bool) -> int:
    if args.cmd in ("run", "train"):
        kwargs = _to_config_kwargs(args)
        recipe = None
        if args.recipe is not None:
            recipe = load_recipe(args.recipe)
            given = _explicit_keys(argv if argv is not None else sys.argv[1:])
            kwargs = {**recipe["config"], **{k: v for k, v in kwargs.items() if k in given}}
            kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        cfg = RunConfig(**kwargs)
        if args.cmd == "run":
            res = pipeline.run_all(cfg, args.out, progress, paper=None if recipe is None else recipe.get("paper"))
            if not args.quiet and os.environ.get("RANK", "0") == "0":
                print(f"done: {args.out}/report.md")
                print("\n".join(pipeline.summary_lines(res, cfg.quick)))
        else:
            ctx, data = pipeline.prepare(cfg, args.out, progress)
            pipeline.stage_fp32(ctx, data)
        return 0
    overrides = _to_config_kwargs(args) if args.cmd in ("allocate", "finetune") else {}
    ctx, data = pipeline.open_run(args.out, progress, needs_device=args.cmd != "report", stage=args.cmd, **overrides)
    if args.cmd == "trace":
        pipeline.stage_trace(ctx, data)
    elif args.cmd == "allocate":
        pipeline.stage_allocate(ctx, data)
    elif args.cmd == "finetune":
        pipeline.stage_finetune(ctx, data)
    elif args.cmd == "evaluate":
        pipeline.stage_evaluate(ctx, data)
    elif args.cmd == "export":
        pipeline.stage_export(ctx, data)
        pipeline.stage_report(ctx)
    elif args.cmd == "report":
        pipeline.stage_report(ctx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
