"""Inference: scores feature events with ONNX Runtime per
deployment (champion, challengers, shadows, canary)."""
