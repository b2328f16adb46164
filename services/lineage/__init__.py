"""Lineage: logs every prediction for query, trace and replay."""
