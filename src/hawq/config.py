"""The resolved configuration of a run: one frozen dataclass, written to run/config.json."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from hawq.hessian.methods import METHODS as TRACE_METHODS  # one list of the trace methods
from hawq.quant.primitives import MAX_BITS, MIN_BITS

DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")


def check_device(device: str) -> None:
    """Raise a ValueError unless `device` (cpu, cuda, cuda:N) exists on this machine.

    Not part of RunConfig's own checks: a run folder made on a GPU machine may still be read (e.g. for its
    report) on one without; the stages that compute call this before they write anything.
    """
    if not isinstance(device, str) or not DEVICE_PATTERN.fullmatch(device):
        raise ValueError(f"unknown device {device!r}: use cpu or cuda[:N]")
    if device == "cpu":
        return
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise ValueError(f"--device {device}: this machine has no CUDA device (or no working driver): "
                         "use --device cpu")
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= n:
        raise ValueError(f"--device {device}: this machine has {n} CUDA device{'s' if n > 1 else ''} "
                         f"(cuda:0..cuda:{n - 1}): choose one of those")


# Fields that decide the full-precision model and its traces: a run folder holding other values is a
# different run. The remaining fields (budget, bit widths, fine-tuning) may change between stage calls.
IDENTITY_FIELDS = (
    "task", "model", "dataset", "seed", "epochs", "batch_size", "lr", "weight_decay", "checkpoint", "weights",
    "image_size", "num_classes",
    "trace_method", "trace_rel_tol", "trace_max_images", "trace_batch_size", "quick",
)



@dataclass(frozen=True)
class RunConfig:
    task: str = "classification"
    model: str | None = None  # None: the task's default (resnet20; retinanet_tiny for detection)
    dataset: str | None = None  # None: the task's first data set (fashion_mnist; lm: python_stdlib)
    data_dir: str | None = None
    download: bool = False
    seed: int = 0
    # full-precision training (skipped with `checkpoint`, or when the cache holds the same config)
    epochs: int | None = None  # None: the task's default (its `defaults`)
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 5e-4
    checkpoint: str | None = None  # full-precision weights of the whole model, as hawq saves them
    retrain: bool = False  # train even when the cache or hawq's bundled models hold this model
    weights: str | None = None  # local pretrained weights handed to the model's constructor (paper models)
    image_size: int | None = None  # ImageNet / COCO: input resolution (None: the model's standard size)
    num_classes: int | None = None  # None: from the data set
    # Hessian traces
    trace_method: str = "auto"
    trace_rel_tol: float = 0.05
    trace_max_images: int | None = None  # None: the task's default (8192; detection: 512)
    trace_batch_size: int = 128
    trace_chunk: int = 64  # images per per-sample backward (cut further to fit the device's memory)
    # allocation
    w_bits: tuple[int, ...] = (2, 3, 4, 8)
    a_bits: int | None = None
    a_bits_options: tuple[int, ...] = ()  # non-empty: joint weight + activation allocation over these
    budget_gbops: float | None = None  # BOPs budget (1e9 bit operations per image), joint allocation
    keep_first_last: bool = True
    budget_mb: float | None = None
    compression: float | None = None
    budget_bits: float = 3.0  # default budget: the size of uniform `budget_bits`-bit weights
    sensitivity: str = "trace"  # "trace" (the paper's) or "diag" (curvature diagonal)
    # fine-tuning and comparison
    ft_images: int | None = None
    ft_lr: float | None = None
    ft_batch_size: int = 128
    distill: bool = False
    ft_skip_within: float = 0.2  # a plan within this many metric points of full precision is not fine-tuned
    # post-training steps (hawq.train.ptq), applied before the "before fine-tuning" score and before fine-tuning
    weight_range: str = "mse"  # per-channel weight clip: "mse" (error-minimising) or "max"
    bn_images: int = 4096  # batch-norm statistics re-estimated on this many training images (0: float ones)
    act_range: str = "mse"  # activation ranges: "mse" (error-minimising clip), "percentile" or "minmax"
    baselines: tuple[int, ...] = (8, 4, 3)
    quick: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        from hawq.tasks import dataset_names, task_defaults, task_names  # the registry (tasks import config)

        for key, value in task_defaults(self.task).items():  # each task's defaults live with the task
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.dataset is None and self.task in task_names():
            object.__setattr__(self, "dataset", dataset_names(self.task)[0])
        if not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(f"unknown device {self.device!r}: use cpu or cuda[:N]")
        if self.task not in task_names():
            raise ValueError(f"unknown task {self.task!r}: choose one of {', '.join(task_names())}")
        if self.dataset not in dataset_names():
            raise ValueError(f"unknown dataset {self.dataset!r}: choose one of {', '.join(dataset_names())}")
        if self.trace_method not in TRACE_METHODS:
            raise ValueError(f"unknown trace method {self.trace_method!r}: choose one of {', '.join(TRACE_METHODS)}")
        if not self.w_bits:
            raise ValueError("no weight bit widths given: pass e.g. --bits 2 3 4 8")
        if self.budget_gbops is not None and self.budget_gbops <= 0:
            raise ValueError(f"--budget-gbops must be positive, got {self.budget_gbops}")
        if self.budget_gbops is not None and not self.a_bits_options and self.a_bits is None:
            raise ValueError("a BOPs budget needs activation bits: add --a-bits-options 4 8 (or --a-bits B)")
        if self.a_bits is not None and self.a_bits_options:
            raise ValueError("give either --a-bits (every layer) or --a-bits-options (allocated), not both")
        extra = [self.a_bits] if self.a_bits is not None else []
        for b in (*self.w_bits, *self.baselines, *self.a_bits_options, *extra):
            if isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS:
                raise ValueError(f"bit width {b!r} is outside {MIN_BITS}..{MAX_BITS}: use whole numbers in that range")
        if self.budget_mb is not None and self.budget_mb <= 0:
            raise ValueError(f"--budget-mb must be positive, got {self.budget_mb}")
        if self.compression is not None and self.compression <= 0:
            raise ValueError(f"--compression must be positive, got {self.compression}")
        if self.budget_mb is not None and self.compression is not None:
            raise ValueError("give either --budget-mb or --compression, not both")
        if not MIN_BITS <= self.budget_bits <= 32:
            raise ValueError(f"--budget-bits must be between {MIN_BITS} and 32, got {self.budget_bits}")
        for name in ("epochs", "batch_size", "trace_max_images", "trace_batch_size", "trace_chunk", "ft_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.ft_images < 0:
            raise ValueError(f"--ft-images must be zero or positive, got {self.ft_images}")
        if self.weight_range not in ("mse", "max"):
            raise ValueError(f"--weight-range {self.weight_range!r} is unknown: use mse or max")
        if self.act_range not in ("minmax", "percentile", "mse"):
            raise ValueError(f"--act-range {self.act_range!r} is unknown: use minmax, percentile or mse")
        if self.bn_images < 0:
            raise ValueError(f"--bn-images must be zero or positive, got {self.bn_images}")
        if not 0 < self.trace_rel_tol < 1:
            raise ValueError(f"--trace-rel-tol must be in (0, 1), got {self.trace_rel_tol}")
        if self.sensitivity not in ("trace", "diag"):
            raise ValueError(f"unknown sensitivity {self.sensitivity!r}: use 'trace' or 'diag'")

    # Sizes of the --quick smoke run: a few hundred images everywhere.
    @property
    def train_images(self) -> int | None:
        return 2048 if self.quick else None

    @property
    def test_images(self) -> int | None:
        return 1000 if self.quick else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["w_bits"], d["baselines"] = list(self.w_bits), list(self.baselines)
        d["a_bits_options"] = list(self.a_bits_options)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - {"kind", "version", "fingerprint", "hawq_version", "torch_version", "machine"}
        if unknown:
            raise ValueError(f"config has unknown keys {sorted(unknown)}: it was written by another tool")
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("w_bits", "baselines", "a_bits_options"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)

    def fingerprint(self) -> str:
        ident = {k: getattr(self, k) for k in IDENTITY_FIELDS}
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=list).encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> RunConfig:
        return replace(self, **changes)
