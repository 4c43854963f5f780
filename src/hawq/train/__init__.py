"""Training, quantization-aware fine-tuning and evaluation."""

from hawq.train.loop import TrainConfig, evaluate, train

__all__ = ["TrainConfig", "evaluate", "train"]
