"""Loopline: streaming MLOps on Kafka."""
