"""Full-precision training, quantization-aware fine-tuning (STE) and top-1 evaluation.

Both loops are SGD with Nesterov momentum and a cosine learning-rate schedule over a fixed number of
images; fine-tuning can distil from the full-precision model (Hinton et al. 2015, temperature T).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from hawq.data.fashion_mnist import TensorDataset, batches


@dataclass(frozen=True)
class TrainConfig:
    n_images: int  # images to process in total (epochs * len(data) for full training)
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    distill_temperature: float | None = None  # None: plain cross-entropy; else KD from a teacher
    distill_alpha: float = 0.5

    def __post_init__(self) -> None:
        if self.n_images <= 0 or self.batch_size <= 0:
            raise ValueError("the number of images and the batch size must be positive")
        if self.lr <= 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _loader(data: Dataset, batch_size: int, shuffle: bool, seed: int, drop_last: bool) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=drop_last,
                      num_workers=min(4, os.cpu_count() or 1), persistent_workers=False)


def _epoch_stream(data: TensorDataset | Dataset, cfg: TrainConfig):
    """Endless (inputs, labels) batches: in-memory tensors, or any map-style Dataset through a DataLoader
    (its own transforms augment, e.g. ImageNet's random crops)."""
    epoch = 0
    drop_last = len(data) >= cfg.batch_size  # a last batch of one breaks batch norm
    while True:
        seed = cfg.seed * 1000 + epoch
        if isinstance(data, TensorDataset):
            yield from batches(data, cfg.batch_size, shuffle=True, seed=seed, augment=True, drop_last=drop_last)
        else:
            yield from _loader(data, cfg.batch_size, True, seed, drop_last)
        epoch += 1


def train(
    model: nn.Module,
    data: TensorDataset | Dataset,
    cfg: TrainConfig,
    *,
    teacher: nn.Module | None = None,
    progress: bool = True,
    desc: str = "train",
) -> dict[str, float]:
    """Train `model` in place on `cfg.n_images` images; returns the final running loss."""
    torch.manual_seed(cfg.seed)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
    )
    n_steps = max(1, math.ceil(cfg.n_images / cfg.batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, n_steps) / n_steps)))
    model.train()
    if teacher is not None:
        teacher.eval()
    running, seen = 0.0, 0
    bar = tqdm(total=n_steps * cfg.batch_size, desc=desc, unit="img", disable=not progress, leave=False)
    stream = _epoch_stream(data, cfg)
    device = next(model.parameters()).device
    for _ in range(n_steps):
        x, y = next(stream)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if teacher is not None and cfg.distill_temperature is not None:
            t = cfg.distill_temperature
            with torch.no_grad():
                soft = F.softmax(teacher(x) / t, dim=1)
            kd = F.kl_div(F.log_softmax(logits / t, dim=1), soft, reduction="batchmean") * t * t
            loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * kd
        if not torch.isfinite(loss):
            raise ValueError("training diverged (loss is not finite): lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        value = loss.item()
        running = 0.98 * running + 0.02 * value if seen else value
        seen += len(y)
        bar.update(len(y))
        bar.set_postfix(loss=f"{running:.3f}")
    bar.close()
    model.eval()
    return {"final_loss": running, "n_images": seen}


@torch.inference_mode()
def evaluate(model: nn.Module, data: TensorDataset | Dataset, batch_size: int = 1000, progress: bool = False) -> float:
    """Top-1 accuracy in percent."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    if isinstance(data, TensorDataset):
        stream, total = batches(data, batch_size), math.ceil(len(data) / batch_size)
    else:
        stream = _loader(data, min(batch_size, 128), False, 0, False)
        total = len(stream)
    for x, y in tqdm(stream, total=total, desc="eval", disable=not progress, leave=False):
        correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
    model.train(was_training)
    return 100.0 * correct / len(data)
