"""Settings of the monitor service (``LOOPLINE_*`` environment variables)."""

from __future__ import annotations

from pydantic import Field

from loopline.settings import ServiceSettings


class MonitorSettings(ServiceSettings):
    """What the monitor needs beyond every service's
    settings; thresholds live in the pipeline spec."""

    batch_size: int = Field(
        5000, ge=1, le=100_000, description="Most messages handled per batch: alerts need no "
        "millisecond latency, and larger batches amortise decoding and per-batch work.")
    checkpoint_interval_s: float = Field(
        5.0, gt=0,
        description="Longest time between two checkpoints of a pipeline's state to the changelog "
        "topic (alerts are committed at once, with the state that raised them).")
    drift_eval_every: int = Field(
        0, ge=0,
        description="Events between two regular comparisons of the last window with the reference "
        "(0: a quarter of spec.monitor.window).")
    resolve_after: int = Field(
        0, ge=0,
        description="Events a drift must look cleared (the last window back in line with the "
        "reference) before its episode resolves (0: half of spec.monitor.window).")
    quality_alert_rate: float = Field(
        0.05, gt=0, le=1,
        description="Missing / type-error / out-of-range share of a window that raises an alert.")
    zombie_check_s: float = Field(
        5.0, gt=0, description="How often deployed versions are checked for traffic.")
    readers_check_s: float = Field(
        30.0, gt=0,
        description="How often consumer groups' committed offsets on the predictions are read "
        "(who reads them).")
    registry_poll_s: float = Field(
        1.0, gt=0, description="How often the registry topic is polled for changes.")
    state_partitions: int = Field(
        12, ge=1, le=1000,
        description="Partitions of the monitor's changelog topic (loopline.state.monitor): "
        "at most this many replicas share the pipelines. Never change it once the topic exists.")
