"""Who reads the predictions: consumer groups' committed offsets, from the broker's admin API."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException
from confluent_kafka.admin import AdminClient

log = logging.getLogger(__name__)

# Loopline's services read predictions too (lineage, trainer); they are not readers
OWN_PREFIX = "loopline-"

# group -> topic -> partition -> next offset to read
Committed = dict[str, dict[str, dict[int, int]]]


@dataclass
class ReaderOffsets:
    """Asks the broker how far each consumer group has committed on the topics of interest."""

    admin: AdminClient
    own_group: str
    timeout_s: float = 10.0

    def committed(self, topics: set[str]) -> Committed:
        """Committed offsets on ``topics`` of every group
        but the monitor's own (raises KafkaException)."""
        listing = self.admin.list_consumer_groups(request_timeout=self.timeout_s).result()
        groups = sorted(g.group_id for g in listing.valid if g.group_id != self.own_group)
        # One group per request (the client's limit), all in flight at once.
        futures = {g: self.admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(g)],
                                                             request_timeout=self.timeout_s)[g]
                   for g in groups}
        out: Committed = {}
        for group, future in futures.items():
            try:
                result = future.result()
            except KafkaException as e:  # the group went away meanwhile, or we may not describe it
                log.info("monitor_group_offsets_unavailable",
                         extra={"group": group, "error": str(e)})
                continue
            for tp in result.topic_partitions:
                if tp.topic in topics and tp.error is None and tp.offset >= 0:
                    out.setdefault(group, {}).setdefault(tp.topic, {})[tp.partition] = tp.offset
        return out


def furthest(committed: Committed, topic: str, readers: list[str]) -> dict[int, int]:
    """Per partition of ``topic``, the furthest offset any counted reader committed.

    ``readers`` names the groups that count; empty: every group except Loopline's own
    (``loopline-*``).
    """
    out: dict[int, int] = {}
    for group, topics in committed.items():
        if (group not in readers) if readers else group.startswith(OWN_PREFIX):
            continue
        for partition, offset in topics.get(topic, {}).items():
            out[partition] = max(out.get(partition, -1), offset)
    return out
