"""Trainer: turns feedback into training data, retrains incrementally, validates, exports ONNX, registers."""

from .export import to_onnx
from .learner import Learner
from .service import TrainerService
from .settings import TrainerSettings

__all__ = ["Learner", "TrainerService", "TrainerSettings", "to_onnx"]
