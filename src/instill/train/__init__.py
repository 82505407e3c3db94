"""The training loop: one loop for full fine-tuning and adapters, one process or many."""

from instill.train.loop import TrainResult, train
from instill.train.loss import SupervisedLM, chunked_cross_entropy

__all__ = ["SupervisedLM", "TrainResult", "chunked_cross_entropy", "train"]
