"""Every Kafka topic name Loopline uses, from this one place."""

from __future__ import annotations

import re
from dataclasses import dataclass

from loopline.errors import SpecError

PREFIX = "loopline"
MODELS = f"{PREFIX}.models"
ALERTS = f"{PREFIX}.alerts"
#: Dead letters of topics that belong to no pipeline (the registry, the alerts).
DEADLETTER = f"{PREFIX}.deadletter"


def state_topic(service: str) -> str:
    """The compacted changelog topic holding a stateful
    service's state (``loopline.state.<service>``)."""
    return f"{PREFIX}.state.{service}"

#: Per-pipeline topic kinds, in the order data flows through them.
KINDS = ("raw", "features", "predictions", "feedback", "deadletter")

# Kafka allows [a-zA-Z0-9._-] up to 249 chars; '.' is our separator so pipelines may not use it.
# Model names follow the same pattern: they appear in registry keys ('/'-separated), metric labels
# and logs, and most models are named after their pipeline. One pattern, checked at every entry.
PIPELINE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
MODEL_NAME = PIPELINE_NAME
_NAME_HINT = "lowercase letter first, then up to 63 lowercase letters, digits, '_' or '-'"


class InvalidName(SpecError):
    """A pipeline or model name breaks the name pattern (field ``name``, rule ``pattern``)."""

    def __init__(self, what: str, name: object) -> None:
        text = str(name) if len(str(name)) <= 80 else f"{str(name)[:80]}..."
        shown = repr(text) if isinstance(name, str) else f"{type(name).__name__} {text}"
        message = f"{what} {shown} must match {PIPELINE_NAME.pattern} ({_NAME_HINT})"
        super().__init__(what, [("name", "pattern", message)])
        # SpecError's text speaks of a pipeline spec; a name given on its own deserves one line.
        self.args = (f"{message} (rule: pattern)",)


def valid_name(name: object) -> bool:
    """Whether ``name`` is a valid pipeline or model name."""
    # fullmatch: with match(), "$" would also accept a name ending in a newline.
    return isinstance(name, str) and PIPELINE_NAME.fullmatch(name) is not None


def check_pipeline_name(name: str) -> str:
    """Return ``name`` if it is a valid pipeline name, else raise :class:`SpecError`."""
    if not valid_name(name):
        raise InvalidName("pipeline name", name)
    return name


def check_model_name(name: str) -> str:
    """Return ``name`` if it is a valid model name, else raise :class:`SpecError`."""
    if not valid_name(name):
        raise InvalidName("model name", name)
    return name


@dataclass(frozen=True)
class PipelineTopics:
    """The five topics of one pipeline."""

    pipeline: str

    def __post_init__(self) -> None:
        check_pipeline_name(self.pipeline)

    def _name(self, kind: str) -> str:
        return f"{PREFIX}.{self.pipeline}.{kind}"

    @property
    def raw(self) -> str:
        """Producer events, JSON or Avro, unvalidated."""
        return self._name("raw")

    @property
    def features(self) -> str:
        """Validated feature events (Avro), written by ingest."""
        return self._name("features")

    @property
    def predictions(self) -> str:
        """One record per event and model variant, written by inference."""
        return self._name("predictions")

    @property
    def feedback(self) -> str:
        """Labels and verdicts sent back by downstream consumers."""
        return self._name("feedback")

    @property
    def deadletter(self) -> str:
        """Rejected input with its original bytes and the reason."""
        return self._name("deadletter")

    def all(self) -> list[str]:
        """All five topic names, in flow order."""
        return [self._name(kind) for kind in KINDS]


def pipeline_of(topic: str) -> str | None:
    """Return the pipeline a per-pipeline topic belongs to, or None for global topics."""
    parts = topic.split(".")
    if len(parts) == 3 and parts[0] == PREFIX and parts[2] in KINDS:
        return parts[1]
    return None


#: Kinds whose records are events: a tombstone (null value) there deletes a key's copies (what
#: `lineage forget` writes on compacted topics), it is no event. Feedback is written by people and
#: tools, so a tombstone there is a mistake and is dead-lettered with its reason.
EVENT_KINDS = ("raw", "features")


def is_event_topic(topic: str) -> bool:
    """True for a pipeline's raw or features topic (see :data:`EVENT_KINDS`)."""
    return pipeline_of(topic) is not None and topic.rsplit(".", 1)[1] in EVENT_KINDS
