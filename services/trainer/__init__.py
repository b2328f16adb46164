"""Trainer: turns feedback into training data, retrains
incrementally, validates, exports ONNX, registers."""

from loopline.services.trainer.export import to_onnx
from loopline.services.trainer.learner import Learner
from loopline.services.trainer.service import TrainerService
from loopline.services.trainer.settings import TrainerSettings

__all__ = ["Learner", "TrainerService", "TrainerSettings", "to_onnx"]
