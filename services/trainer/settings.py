"""Settings of the trainer service (``LOOPLINE_*`` variables)."""

from __future__ import annotations

from pydantic import Field

from loopline.settings import ServiceSettings


class TrainerSettings(ServiceSettings):
    """How the trainer joins feedback, checkpoints and reaches the registry."""

    checkpoint_interval_s: float = Field(
        5.0, gt=0,
        description="Longest time between two checkpoints of a pipeline's learners, joins and "
        "offsets to the changelog topic (loopline.state.trainer).")
    state_partitions: int = Field(
        12, ge=1, le=1000,
        description="Partitions of the trainer's changelog topic: at most this many "
        "replicas share the pipelines. Never change it once the topic exists.")
    registry_poll_s: float = Field(
        0.5, gt=0, le=60, description="Longest time between two reads of new registry events.")
    max_join_entries: int = Field(
        1_000_000, ge=100,
        description="Most events, predictions or waiting feedback one pipeline's join "
        "holds; beyond it the oldest are dropped (as if their TTL had passed).")
    reference_rows: int = Field(
        2000, ge=10, description="Recent labeled examples registered as a version's reference data "
        "(its drift profile and fill values).")

