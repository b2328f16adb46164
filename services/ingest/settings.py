"""Settings of the ingest service (``LOOPLINE_*`` environment variables)."""

from __future__ import annotations

from pydantic import Field

from loopline.settings import ServiceSettings


class IngestSettings(ServiceSettings):
    """What ``loopline run ingest`` reads from the environment, on top of the service settings."""

    deadletter_max_bytes: int = Field(
        8 * 1024 * 1024, ge=4096, le=100_000_000,
        description="Largest dead-letter message ingest produces. A rejected original that does "
                    "not fit is kept truncated, with its full length and sha256 in the dead "
        "letter's message (never dropped). On Apache Kafka the dead-letter topic's "
        "max.message.bytes must be at "
        "least this.",
    )
    registry_poll_s: float = Field(
        1.0, gt=0, le=300,
        description="How often the registry is checked for new or changed pipeline specs between "
                    "batches.",
    )
    idempotency_window: int = Field(
        1_000_000, ge=0, le=100_000_000,
        description="Producer event ids remembered to recognise a re-sent event (same id, same "
                    "content: a counted duplicate, not forwarded) or a conflict (same id, other "
        "content: dead-lettered with "
        "both contents findable). Rebuilt at start from the end of the features topics. 0: off.",
    )
