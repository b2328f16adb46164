"""Alert once per episode: a signal is raised when it first crosses a level, resolved when clear.

An episode is keyed by (signal, model, version, feature, detector). Levels are ``None`` (fine),
``"warning"`` and ``"alert"``. Rising to a higher level emits a ``raised`` event (an escalation
carries the new severity); staying at or falling back to a non-None level emits nothing; falling to
``None`` emits ``resolved``, with its ``resolution`` (why it ended: "cleared" unless the caller says
"new_reference", "rebaseline" or "retired"). So a drift seen by thousands of events produces two
alert events. ``first_offset`` (and ``first_partition``) say where an episode's change began: the
caller's, when it knows (a change point), else the offset that raised it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loopline.alerts import alert_event

_RANK = {None: 0, "warning": 1, "alert": 2}


@dataclass(frozen=True)
class EpisodeKey:
    """What an episode is about."""

    signal: str
    feature: str | None = None
    detector: str | None = None
    model_name: str | None = None
    model_version: int | None = None

    def label(self) -> str:
        """A short text form, for ids and logs."""
        return "|".join(
            str(x)
            for x in (self.signal, self.model_name, self.model_version, self.feature, self.detector)
        )


@dataclass
class Episode:
    """One open episode."""

    number: int
    severity: str
    first_offset: int | None
    last_offset: int | None
    opened_at: int
    first_partition: int | None = None


@dataclass
class Episodes:
    """The open episodes of one pipeline and how many each key has had (for stable alert ids)."""

    pipeline: str
    open: dict[EpisodeKey, Episode] = field(default_factory=dict)
    counts: dict[EpisodeKey, int] = field(default_factory=dict)

    def is_open(self, key: EpisodeKey) -> bool:
        """Whether an episode of ``key`` is open."""
        return key in self.open

    def observe(
        self,
        key: EpisodeKey,
        level: str | None,
        message: str,
        *,
        at: int,
        offset: int | None = None,
        **fields: Any,
    ) -> dict[str, Any] | None:
        """Record the current level of ``key``; return the alert event to send, if any.

        ``fields`` are optional alert columns (statistic, threshold, window, detector, ...);
        ``message`` says for a person what happened.
        """
        current = self.open.get(key)
        first = fields.pop("first_offset", None)
        first_partition = fields.pop("first_partition", None)
        columns = {
            "feature": key.feature,
            "detector": key.detector,
            "model_name": key.model_name,
            "model_version": key.model_version,
            **fields,
        }
        if current is None:
            if level is None:
                return None
            number = self.counts.get(key, 0) + 1
            self.counts[key] = number
            first = offset if first is None else first
            self.open[key] = current = Episode(number, level, first, offset, at, first_partition)
            return self._event(key, current, "raised", level, message, at, columns)
        if offset is not None:
            current.last_offset = offset
        if level is None:
            del self.open[key]
            columns.setdefault("resolution", "cleared")
            return self._event(key, current, "resolved", current.severity, message, at, columns)
        if _RANK[level] > _RANK[current.severity]:
            current.severity = level
            return self._event(key, current, "raised", level, message, at, columns)
        return None

    def _event(
        self,
        key: EpisodeKey,
        episode: Episode,
        state: str,
        severity: str,
        message: str,
        at: int,
        columns: dict[str, Any],
    ) -> dict[str, Any]:
        suffix = f":{severity}" if state == "raised" else ""
        return alert_event(
            self.pipeline,
            key.signal,
            message,
            state=state,  # type: ignore[arg-type]  # a checked Literal
            severity=severity,  # type: ignore[arg-type]  # a checked Literal
            episode=f"{key.label()}#{episode.number}{suffix}",
            at=at,
            first_offset=episode.first_offset,
            first_partition=episode.first_partition,
            last_offset=episode.last_offset,
            **columns,
        )
