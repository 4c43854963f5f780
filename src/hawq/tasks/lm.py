"""Language modelling: a small GPT-style byte model (hawq.models.char_gpt) on text files, scored by perplexity.

Data: the Python standard library's own source files (*.py under the running interpreter's stdlib folder;
nothing downloaded), or `--data-dir` with a user's text files (*.py, *.txt, *.md, recursively). Files are split
by a hash of their path, 1 in 20 to validation; the text is read as bytes (vocabulary 256). Training samples
random windows of `context` + 1 bytes (input and next-byte targets); validation uses the first fixed windows.
One sequence is one sample of the Hessian traces (hawq.hessian: sequence cross-entropy).
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from hawq.config import RunConfig
from hawq.models import create_model
from hawq.tasks.base import Task
from hawq.tasks.fp32 import cache_dir, cached_or_trained

CONTEXT = 64
SUFFIXES = (".py", ".txt", ".md")
VAL_SEQUENCES, QUICK_VAL_SEQUENCES = 2048, 256
QUICK_TRAIN_BYTES = 1 << 20  # a --quick run reads the first MiB of training text


@dataclass
class TextData:
    train: Tensor  # uint8 bytes of the training files, concatenated
    val: Tensor  # (N, CONTEXT + 1) validation windows
    source: str


def text_files(cfg: RunConfig) -> tuple[list[Path], str]:
    root = Path(cfg.data_dir) if cfg.data_dir else Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ValueError(f"--data-dir {root} is not a folder of text files: pass one holding *.py, *.txt or *.md")
    files = sorted(p for p in root.rglob("*") if p.suffix in SUFFIXES and p.is_file()
                   and "site-packages" not in p.parts)
    if not files:
        raise ValueError(f"no *.py, *.txt or *.md files under {root}: pass another --data-dir")
    return files, str(root)


def _is_val(path: Path, root: str) -> bool:
    return int(hashlib.sha256(str(path.relative_to(root)).encode()).hexdigest(), 16) % 20 == 0


def load_text(cfg: RunConfig) -> TextData:
    files, root = text_files(cfg)
    train, val = bytearray(), bytearray()
    for p in files:
        try:
            data = p.read_bytes()
        except OSError:
            continue
        (val if _is_val(p, root) else train).extend(data + b"\n")
    if cfg.quick:
        train = train[:QUICK_TRAIN_BYTES]
    n_val = QUICK_VAL_SEQUENCES if cfg.quick else VAL_SEQUENCES
    w = CONTEXT + 1
    if len(train) < 10 * w or len(val) < w:
        raise ValueError(f"{root} holds too little text ({len(train)} training, {len(val)} validation bytes): "
                         "pass a --data-dir with more files")
    # bytearrays: torch.frombuffer warns on read-only bytes
    val_t = torch.frombuffer(val[: min(n_val, len(val) // w) * w], dtype=torch.uint8).reshape(-1, w)
    return TextData(torch.frombuffer(train, dtype=torch.uint8).clone(), val_t.clone(), root)


def windows(text: Tensor, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """n random windows: inputs (n, CONTEXT) and next-byte targets (n, CONTEXT), int64."""
    start = torch.randint(0, len(text) - CONTEXT - 1, (n,), generator=generator)
    idx = start[:, None] + torch.arange(CONTEXT + 1)
    w = text[idx].long()
    return w[:, :-1], w[:, 1:]


def train_lm(model: nn.Module, text: Tensor, n_sequences: int, batch_size: int, lr: float, seed: int,
             progress: bool, desc: str = "train lm") -> dict:
    """AdamW with a cosine schedule on `n_sequences` random windows; returns the final running loss."""
    g = torch.Generator().manual_seed(seed)
    steps = max(1, math.ceil(n_sequences / batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    device = next(model.parameters()).device
    model.train()
    running = None
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        x, y = windows(text, batch_size, g)
        loss = F.cross_entropy(model(x.to(device)).flatten(0, 1), y.to(device).flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
    model.eval()
    return {"final_loss": running, "n_sequences": steps * batch_size}


@torch.inference_mode()
def perplexity(model: nn.Module, val: Tensor, batch_size: int = 256) -> tuple[float, float]:
    """(perplexity, next-byte top-1 %) on the validation windows."""
    device = next(model.parameters()).device
    total, correct, n = 0.0, 0, 0
    for i in range(0, len(val), batch_size):
        w = val[i : i + batch_size].long().to(device)
        logits = model(w[:, :-1])
        total += float(F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
        correct += int((logits.argmax(-1) == w[:, 1:]).sum())
        n += w[:, 1:].numel()
    return math.exp(total / n), 100.0 * correct / n


class LanguageModelTask(Task):
    name = "lm"
    metric = "ppl"  # validation perplexity, lower is better
    metrics = ("ppl", "top1")
    higher_is_better = False
    defaults = {"model": "char_gpt", "epochs": 1, "batch_size": 64, "lr": 3e-3, "ft_images": 8192, "ft_lr": 3e-4,
                "trace_max_images": 1024}
    train_sequences = 128 * 1024  # per epoch

    def load_data(self, cfg: RunConfig) -> TextData:
        return load_text(cfg)

    def build_model(self, cfg: RunConfig) -> nn.Module:
        torch.manual_seed(cfg.seed)
        return create_model(cfg.model, context=CONTEXT)

    def full_precision_model(self, cfg: RunConfig, data: TextData, progress: bool) -> tuple[nn.Module, dict]:
        model = self.build_model(cfg)
        if cfg.checkpoint is not None:
            self.load_state_into(model, cfg.checkpoint)
            return model.to(cfg.device).eval(), {"source": f"checkpoint {cfg.checkpoint}"}
        n = (self.train_sequences // 16 if cfg.quick else self.train_sequences) * cfg.epochs
        ident = {"task": "lm", "model": cfg.model, "source": data.source, "n_train_bytes": len(data.train),
                 "n_sequences": n, "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed, "algo": 1}
        key = hashlib.sha256(repr(sorted(ident.items())).encode()).hexdigest()[:16]
        return cached_or_trained(
            model, lambda: self.build_model(cfg), cache_dir() / "fp32" / f"{cfg.model}-lm-{key}.pt", cfg.device,
            lambda m: train_lm(m, data.train, n, cfg.batch_size, cfg.lr, cfg.seed, progress), {"cache_key": key},
            ident, retrain=cfg.retrain)

    def evaluate(self, model: nn.Module, data: TextData, progress: bool) -> dict[str, float]:
        ppl, top1 = perplexity(model, data.val)
        return {"ppl": ppl, "top1": top1}

    def example_input(self, data: TextData) -> Tensor:
        return data.val[:1, :-1].long()

    def trace_batches(self, cfg: RunConfig, data: TextData):
        g = torch.Generator().manual_seed(cfg.seed + 1)
        while True:  # the estimator stops at its own max_images
            yield windows(data.train, cfg.trace_batch_size, g)

    def export_batches(self, data: TextData):
        """(inputs, next-byte targets) of the validation windows: the exported model is checked at every position."""
        for i in range(0, len(data.val), 256):
            w = data.val[i : i + 256].long()
            yield w[:, :-1], w[:, 1:]

    def export_scores(self, verified) -> dict[str, float]:
        """Perplexity, exp(mean cross-entropy over every position), from PyTorch's and onnxruntime's logits."""
        return {"torch": math.exp(verified.torch_cross_entropy), "onnx": math.exp(verified.onnx_cross_entropy)}

    def calibration_batches(self, data: TextData):
        g = torch.Generator().manual_seed(12345)
        return [(windows(data.train, 64, g)[0],) for _ in range(8)]

    def finetune(self, model: nn.Module, data: TextData, cfg: RunConfig, n_images: int, teacher: nn.Module | None,
                 progress: bool, desc: str) -> dict:
        stats = train_lm(model, data.train, n_images, cfg.batch_size, cfg.ft_lr, cfg.seed + 7, progress, desc)
        return {"n_sequences": stats["n_sequences"], "lr": cfg.ft_lr, "batch_size": cfg.batch_size}
