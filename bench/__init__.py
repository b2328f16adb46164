"""Benchmarks: throughput as ratios to limits measured in the same run (see README.md)."""
