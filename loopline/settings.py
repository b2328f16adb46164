"""Configuration: one settings object per process, read from ``LOOPLINE_*`` environment variables.

Build it in ``main()`` and pass it down; nothing here reads the environment at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: Default limit of an artifact's size (models beyond it are refused, never read whole).
ARTIFACT_MAX_BYTES = 512 * 1024 * 1024


class LooplineSettings(BaseSettings):
    """Settings every Loopline command and service shares."""

    model_config = SettingsConfigDict(env_prefix="LOOPLINE_", extra="ignore", frozen=True)

    home: Path = Field(
        Path(".loopline"),
        description="State folder: embedded broker state file and logs, local artifacts, lineage "
                    "store.",
    )
    bootstrap_servers: str | None = Field(
        None,
        description="Kafka bootstrap servers (host:port,...). Unset: use the broker recorded in "
        "LOOPLINE_HOME by `loopline broker` or `loopline up`.",
    )
    engine: Literal["tansu", "kafka"] = Field(
        "tansu",
        description="Broker `loopline broker` and `loopline up` start when no cluster is set: "
        "'tansu' (embedded, memory storage, nothing to install) or 'kafka' (Apache Kafka from "
        "Maven artifacts, durable in LOOPLINE_HOME/kafka; needs Java 17+, Maven once).",
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security.protocol."
    )
    sasl_mechanism: str | None = Field(None,
                                       description="Kafka sasl.mechanism, e.g. PLAIN or "
                                                   "SCRAM-SHA-512.")
    sasl_username: str | None = Field(None, description="Kafka sasl.username.")
    sasl_password: SecretStr | None = Field(None, description="Kafka sasl.password.")
    ssl_ca_location: str | None = Field(None, description="CA certificate file for SSL / SASL_SSL.")
    kafka_profile: Literal["auto", "embedded", "kafka"] = Field(
        "auto",
        description="Client tuning: 'embedded' for the Tansu broker, 'kafka' for Apache Kafka and "
        "compatibles; 'auto' follows the engine of the broker recorded in LOOPLINE_HOME.",
    )
    session_timeout_ms: int = Field(
        10_000, ge=1_000,
        description="Consumer group session timeout (the embedded broker joins in ~half of it)."
    )
    replication_factor: int = Field(
        1, ge=-1, description="Replication factor of topics Loopline creates (-1: broker default)."
    )
    delivery: Literal["auto", "exactly-once", "at-least-once"] = Field(
        "auto",
        description="Processing guarantee of services that consume and produce: 'exactly-once' "
                    "uses Kafka transactions (consume -> produce -> send offsets -> commit); "
        "'at-least-once' stores offsets "
        "after the outputs are acknowledged (idempotent sinks hide retries); 'auto' picks "
        "exactly-once on Kafka and at-least-once on the embedded broker, which has no "
        "transactions.",
    )
    instance_id: str | None = Field(
        None,
        description="Stable name of this replica among its service's replicas (default: the host "
                    "name), part of its transactional id, so a restarted replica aborts what its "
        "predecessor left open.",
    )
    artifact_uri: str | None = Field(
        None,
        description="The artifact store model versions are written to and loaded from, by sha256: "
                    "a folder, file:// or s3://bucket/prefix URI (unset: "
        "$LOOPLINE_HOME/artifacts). A registry "
        "record's uri is informational and never read.")
    artifact_max_bytes: int = Field(
        ARTIFACT_MAX_BYTES, ge=1,
        description="Largest model artifact stored or loaded, in bytes; a larger "
        "one is refused.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO",
                                                                    description="Log level.")
    log_format: Literal["json", "console"] = Field(
        "json", description="'json': one JSON object per line; 'console': readable lines."
    )


class ServiceSettings(LooplineSettings):
    """Settings of a long-running service process (metrics, health, batching)."""

    metrics_host: str = Field("127.0.0.1",
                              description="Address the metrics/health HTTP server binds.")
    metrics_port: int = Field(
        0, ge=0, le=65535, description="Port of the metrics/health HTTP server (0: any free port)."
    )
    pipelines: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Pipelines to serve, comma separated (empty: every pipeline in the registry).",
    )
    group_id: str | None = Field(None, description="Consumer group (default: loopline-<service>).")
    batch_size: int = Field(1000, ge=1, le=100_000, description="Most messages handled per batch.")
    batch_timeout_s: float = Field(
        0.05, gt=0, le=10,
        description="Longest wait for a batch to fill before handling what arrived."
    )

    @field_validator("pipelines", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value
