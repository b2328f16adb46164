"""Trainer: turns feedback into training data, retrains incrementally, validates, exports ONNX, registers."""
