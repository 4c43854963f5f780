"""Train the default full-precision model from its recipe and write it to src/hawq/bundled/.

`hawq run` (and `hawq run --quick`) then skip training on a fresh machine: a bundled model is used when its
name (model, data set, training configuration) and its training data's fingerprint match. The slow test
`tests/test_bundled.py::test_bundled_default_model_is_reproduced_by_its_recipe` retrains it and compares.

    .venv/bin/python scripts/make_bundled.py [hawq run options, e.g. --seed 0]
"""

from __future__ import annotations

import sys

from hawq.cli import _to_config_kwargs, build_parser
from hawq.config import RunConfig
from hawq.tasks.classification import make_bundled
from hawq.tasks.fp32 import BUNDLED_DIR


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(["train", *argv])
    cfg = RunConfig(**_to_config_kwargs(args))
    path, record = make_bundled(cfg, BUNDLED_DIR, progress=not args.quiet)
    print(f"{path}: top-1 {record['top1']:.2f}% (torch {record['torch']}, {record['threads']} threads)")


if __name__ == "__main__":
    main(sys.argv[1:])
