"""Training, quantization-aware fine-tuning, post-training steps and evaluation."""

from hawq.train.loop import TrainConfig, evaluate, train
from hawq.train.ptq import PostTrainConfig, bias_correct_, post_train_, reestimate_bn_

__all__ = ["PostTrainConfig", "TrainConfig", "bias_correct_", "evaluate", "post_train_", "reestimate_bn_", "train"]
