"""Topic incarnations: Kafka's topic id, so stores never mistake a new topic for one they hold.

A broker that restarts empty (the embedded one keeps topics in memory) or a topic deleted and
created again starts its offsets at 0 again; anything keyed on (topic, partition, offset) alone
would take new messages for ones it already holds. The topic id (a UUID Kafka gives each topic
when it is created) tells the incarnations apart.
"""

from __future__ import annotations

import logging

from confluent_kafka import KafkaException, TopicCollection
from confluent_kafka.admin import AdminClient

log = logging.getLogger(__name__)

UNKNOWN = "unknown"


class TopicIds:
    """Topic ids by name, asked of the broker once per topic (``refresh`` forgets them)."""

    def __init__(self, admin: AdminClient, timeout_s: float = 10.0) -> None:
        self.admin = admin
        self.timeout_s = timeout_s
        self._ids: dict[str, str] = {}

    def get(self, topic: str) -> str:
        """The id of ``topic`` (``unknown`` if the broker does not say: old brokers have none)."""
        known = self._ids.get(topic)
        if known is not None:
            return known
        try:
            future = self.admin.describe_topics(TopicCollection([topic]),
                                                request_timeout=self.timeout_s)[topic]
            topic_id = str(future.result().topic_id)
        except KafkaException as e:
            log.warning("topic_id_unknown", extra={"topic": topic, "error": e.args[0].str()})
            return UNKNOWN
        self._ids[topic] = topic_id
        return topic_id

    def refresh(self) -> None:
        """Forget the cached ids (after a rebalance or a broker restart)."""
        self._ids.clear()
