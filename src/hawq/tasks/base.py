"""The contract between a task and the pipeline's stages: `Task`.

A task says what its data, model, training, score and Hessian loss are; the stages (hawq.pipeline) do the
rest. A subclass implements the abstract methods; the others have defaults that fit most tasks, and a
stage a task cannot do is refused in one line (`refuse`) before anything is written. Register a task with
`hawq.tasks.register_task` and `hawq run --task NAME` runs it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from hawq.config import RunConfig


class Task(ABC):
    """One task behind the stages: image classification, detection, or a user's own."""

    name: ClassVar[str] = "task"
    metric: ClassVar[str] = "score"  # the score of `evaluate` the results compare (higher is better)
    metrics: ClassVar[tuple[str, ...]] = ("score",)
    higher_is_better: ClassVar[bool] = True  # of `metric` (perplexity: False)
    # RunConfig fields the task sets when the command line leaves them unset; a subclass's dict is laid over
    # these (hawq.tasks.task_defaults)
    defaults: ClassVar[dict[str, Any]] = {"epochs": 1, "batch_size": 64, "lr": 0.01, "ft_images": 1024,
                                          "ft_lr": 1e-3, "trace_max_images": 1024}
    # stages this task cannot do, with the reason: e.g. {"export": "ONNX export of detectors is not supported"}
    refuses: ClassVar[dict[str, str]] = {}

    # ------------------------------------------------------------------ what every task must say
    @abstractmethod
    def load_data(self, cfg: RunConfig) -> Any:
        """The task's data (any object the other methods understand); a one-line ValueError if it is missing."""

    @abstractmethod
    def build_model(self, cfg: RunConfig) -> nn.Module:
        """A fresh model (weights from cfg.seed, or cfg.weights)."""

    @abstractmethod
    def full_precision_model(self, cfg: RunConfig, data: Any, progress: bool) -> tuple[nn.Module, dict]:
        """The trained full-precision model and a record ({"source": ...}): trained, cached or loaded."""

    @abstractmethod
    def evaluate(self, model: nn.Module, data: Any, progress: bool) -> dict[str, float]:
        """Scores, `metric` among them."""

    @abstractmethod
    def example_input(self, data: Any) -> Tensor:
        """One input batch (for the first/last layer search, MACs and export)."""

    @abstractmethod
    def trace_batches(self, cfg: RunConfig, data: Any) -> Iterable[tuple[Tensor, Tensor]]:
        """(inputs, targets) batches for the Hessian traces."""

    @abstractmethod
    def calibration_batches(self, data: Any) -> Iterable[Any]:
        """Batches whose first element is an input: activation ranges and batch-norm re-estimation."""

    @abstractmethod
    def finetune(self, model: nn.Module, data: Any, cfg: RunConfig, n_images: int, teacher: nn.Module | None,
                 progress: bool, desc: str) -> dict:
        """Quantization-aware fine-tuning in place on `n_images` images; returns its settings."""

    # ------------------------------------------------------------------ defaults
    def load_state_into(self, model: nn.Module, path: str | Path) -> None:
        from hawq.tasks.fp32 import load_state_into

        load_state_into(model, path)

    def trace_loss(self, model: nn.Module) -> Any:
        """The loss of the traces: "cross_entropy" or a callable(output, target)."""
        return "cross_entropy"

    def fixed_layers(self, model: nn.Module, bits: int = 8) -> dict[str, int] | None:
        """Layers kept at `bits`; None: the allocator's default (the first and the last layer)."""
        return None

    def export_batches(self, data: Any) -> Iterable[Any]:
        """(inputs, labels) on which an exported model is checked against PyTorch."""
        self.refuse("export")
        return ()

    def export_scores(self, verified: Any) -> dict[str, float]:
        """`metric` from PyTorch's and from onnxruntime's outputs on the export batches, {"torch": .., "onnx": ..},
        read off the check's `hawq.export.VerifyReport`; {} when only top-1 is compared (the default)."""
        return {}

    def refuse(self, stage: str) -> None:
        """Raise the one-line error of a stage this task cannot do (nothing is written before it)."""
        if stage in self.refuses or stage == "export" and type(self).export_batches is Task.export_batches:
            why = self.refuses.get(stage, "it defines no export_batches to check the exported model on")
            raise ValueError(f"the {self.name} task cannot run the {stage} stage: {why}")
