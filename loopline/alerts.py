"""Alert events on ``loopline.alerts`` (schemas/alert.avsc): one per episode start or end."""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from loopline import avro, topics
from loopline.kafka import AckedProducer
from loopline.registry import now_ms

_OPTIONAL = ("model_name", "model_version", "feature", "detector", "statistic", "threshold",
             "window", "first_offset", "last_offset", "first_partition", "reference_value",
             "current_value", "p_value", "effective_n", "performance_metric",
             "performance_baseline", "performance_now", "labeled", "action", "resolution")


def alert_event(pipeline: str, signal: str, message: str, *,
                state: Literal["raised", "resolved"] = "raised",
                severity: Literal["warning", "alert"] = "alert", episode: str = "",
                at: int | None = None, **fields: Any) -> dict[str, Any]:
    """Build an alert record; ``episode`` (e.g. a first offset) makes ``alert_id`` stable across
    retries.

    ``fields`` are the optional columns of the schema (schemas/alert.avsc): what (model_name,
    model_version, feature, detector), how much (statistic, threshold, reference_value,
    current_value, p_value, effective_n), where and since when (window, first_offset,
    first_partition, last_offset), the labeled performance meanwhile (performance_metric,
    performance_baseline, performance_now, labeled), what to do (action) and, when resolved, why
    (resolution).
    """
    unknown = set(fields) - set(_OPTIONAL)
    if unknown:
        raise TypeError(f"unknown alert field(s): {sorted(unknown)}")
    at = now_ms() if at is None else at
    identity = "|".join(str(x) for x in (pipeline, signal, fields.get("model_name"),
                                         fields.get("model_version"),
                                         fields.get("feature"), fields.get("detector"), state,
                                         episode or at))
    return {
        "alert_id": hashlib.sha256(identity.encode()).hexdigest()[:32],
        "pipeline": pipeline, "state": state, "severity": severity, "signal": signal,
        **{k: fields.get(k) for k in _OPTIONAL}, "message": message, "at": at,
    }


def send_alert(producer: AckedProducer, event: dict[str, Any]) -> None:
    """Queue an alert (keyed by pipeline, so one pipeline's alerts stay in order)."""
    producer.send(topics.ALERTS, avro.codec("alert").encode(event), key=event["pipeline"].encode())
