"""Units of ownership for stateful services: who owns which pipeline, and its state and offsets.

A stateful service (the monitor, the trainer) keeps per-pipeline state that is a statistic over
all of that pipeline's partitions, so its unit of ownership is the pipeline. Replicas share a
consumer group on the service's changelog topic (:mod:`loopline.runtime.state`): the group
assigns changelog partitions, and a replica owns the pipelines whose names hash to the partitions
it was assigned. For each owned unit it restores the state, then reads the unit's input topics by
explicit assignment (all their partitions) from the offsets stored with that state. When the
group moves a partition away (a replica joins, or one died and its session timed out), the
units of it are checkpointed (on a clean hand-over) and dropped here; the new owner restores them.

:class:`Units` is the loop's :class:`~loopline.runtime.loop.Checkpointer` for such services: a
checkpoint writes every changed unit's state with its offsets into the same commit as the outputs
that state caused, so after a crash a unit resumes exactly where its last committed state ends —
no example learned twice, no alert raised twice, none lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, Message, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge

from loopline.errors import LooplineError
from loopline.runtime.incarnation import TopicIds
from loopline.runtime.outputs import Outputs
from loopline.runtime.state import Changelog

log = logging.getLogger(__name__)

Start = Literal["beginning", "end"]


@dataclass(frozen=True)
class Input:
    """An input topic of a unit, and where a unit without state starts reading it."""

    topic: str
    start: Start = "beginning"


class UnitHandler(Protocol):
    """What a stateful service tells :class:`Units` about its units."""

    #: Bumped when the unit state's objects change shape: a record of another version starts fresh.
    state_version: int

    def known_units(self) -> list[str]:
        """Every unit this service could own now (the registry's pipelines it serves)."""

    def inputs(self, unit: str) -> list[Input]:
        """The topics a unit reads."""

    def install(self, unit: str, state: Any | None) -> None:
        """Take over a unit: its restored state, or None for a fresh start."""

    def snapshot(self, unit: str) -> Any:
        """The state of an owned unit, to checkpoint."""

    def remove(self, unit: str) -> None:
        """Give a unit up (after its last checkpoint, if any)."""


@dataclass
class _Unit:
    """Where an owned unit's state stands in its inputs."""

    offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # next offset to read
    topic_ids: dict[str, str] = field(default_factory=dict)
    dirty: bool = False


class UnitsMetrics:
    """Ownership and checkpoint metrics."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.service = service
        self.owned = Gauge("loopline_units_owned", "Units (pipelines) this replica owns",
                           ["service"], registry=registry)
        self.restores = Counter("loopline_unit_restores",
                                "Units taken over, by outcome (restored, fresh, "
                                "unreadable)", ["service", "outcome"], registry=registry)
        self.checkpoints = Counter("loopline_unit_checkpoints",
                                   "Unit states written to the changelog",
                                   ["service"], registry=registry)
        self.checkpoint_bytes = Gauge("loopline_unit_checkpoint_bytes",
                                      "Size of the last checkpoint written",
                                      ["service"], registry=registry)


class Units:
    """Ownership, restore and checkpoints of a stateful
    service's units; see the module docstring."""

    def __init__(self, service: str, changelog: Changelog, group: Consumer, data: Consumer,
                 handler: UnitHandler, topic_ids: TopicIds, metrics: UnitsMetrics,
                 checkpoint_interval_s: float = 5.0) -> None:
        self.service = service
        self.changelog = changelog
        self.group = group
        self.data = data
        self.handler = handler
        self.topic_ids = topic_ids
        self.metrics = metrics
        self.checkpoint_interval_s = checkpoint_interval_s
        self.partitions: set[int] = set()
        self.units: dict[str, _Unit] = {}
        self._parked: dict[str, Any] = {}  # restored states of units the registry does not know yet
        # data partitions assigned, with start offsets
        self._assigned: dict[tuple[str, int], int] = {}
        self._before: dict[str, dict[tuple[str, int], int]] = {}
        self._last_checkpoint = time.monotonic()
        self._requested = False
        self.assigned_once = False
        #: Set by the loop: commits the pending outputs and a checkpoint right now (used on revoke).
        self.commit_now: Callable[[], None] | None = None

    # ---- membership ---------------------------------------------------------------------------
    def start(self) -> None:
        """Create the changelog if needed and join the group."""
        self.changelog.ensure()
        self.group.subscribe([self.changelog.topic], on_assign=self._on_assign,
                             on_revoke=self._on_revoke, on_lost=self._on_lost)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        _guarded(self._on_assign_, consumer, partitions)

    def _on_assign_(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        consumer.pause(partitions)  # the changelog is read by restore(), never through the group
        gained = {tp.partition for tp in partitions if tp.topic == self.changelog.topic}
        if not gained:
            return
        self.partitions |= gained
        self.assigned_once = True
        self._take(gained)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        _guarded(self._on_revoke_, consumer, partitions)

    def _on_revoke_(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        lost = {tp.partition for tp in partitions if tp.topic == self.changelog.topic}
        if not lost:
            return
        if self.commit_now is not None:
            try:
                self.commit_now()  # hand the units over with everything they caused committed
            except Exception as e:  # noqa: BLE001 - the next owner resumes from the last commit anyway
                log.warning("handover_commit_failed",
                            extra={"service": self.service, "error": str(e)[:300]})
        self._give_up(lost)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        _guarded(self._on_lost_, consumer, partitions)

    def _on_lost_(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The group already gave them to someone else: nothing of ours may be committed for them.
        self._give_up({tp.partition for tp in partitions if tp.topic == self.changelog.topic})

    def _take(self, partitions: set[int]) -> None:
        started = time.monotonic()
        restored = self.changelog.restore(partitions)
        self._parked.update({u: s for u, s in restored.states.items()
                             if self.changelog.partition_of(u) in partitions})
        for _unit in restored.unreadable:
            self.metrics.restores.labels(self.service, "unreadable").inc()
        self.sync()
        units = sorted(u for u in self.units if self.changelog.partition_of(u) in partitions)
        log.info("units_assigned", extra={"service": self.service, "partitions": sorted(partitions),
                                          "units": units,
                                          "restore_s": round(time.monotonic() - started, 3)})

    def _give_up(self, partitions: set[int]) -> None:
        self.partitions -= partitions
        for unit in [u for u in self.units if self.changelog.partition_of(u) in partitions]:
            self.handler.remove(unit)
            del self.units[unit]
        self._parked = {u: s for u, s in self._parked.items()
                        if self.changelog.partition_of(u) not in partitions}
        self._reassign()
        self.metrics.owned.labels(self.service).set(len(self.units))
        log.info("units_revoked", extra={"service": self.service, "partitions": sorted(partitions)})

    def sync(self) -> None:
        """Adopt units the registry now knows in owned partitions; drop those it no longer has."""
        known = set(self.handler.known_units())
        for unit in sorted(known - set(self.units)):
            if self.changelog.partition_of(unit) not in self.partitions:
                continue
            envelope = self._parked.pop(unit, None)
            self.units[unit] = self._install(unit, envelope)
        for unit in sorted(set(self.units) - known):
            self.handler.remove(unit)
            del self.units[unit]
        self._reassign()
        self.metrics.owned.labels(self.service).set(len(self.units))

    def _install(self, unit: str, envelope: Any) -> _Unit:
        record = _Unit()
        state = None
        version = getattr(self.handler, "state_version", 1)
        if isinstance(envelope, dict) and envelope.get("version", 1) != version:
            log.warning("unit_state_version", extra={"service": self.service, "unit": unit,
                                                     "stored": envelope.get("version", 1),
                                                     "current": version,
                                                     "action": "starting fresh from the input "
                                                               "topics"})
            envelope = None
        if isinstance(envelope, dict) and "state" in envelope:
            state = envelope["state"]
            record.offsets = dict(envelope.get("offsets", {}))
            record.topic_ids = dict(envelope.get("topic_ids", {}))
            for topic, old in list(record.topic_ids.items()):
                now = self.topic_ids.get(topic)
                if now != old:
                    # Offsets of another incarnation of the topic mean nothing here.
                    log.error("input_topic_recreated", extra={"service": self.service, "unit": unit,
                                                              "topic": topic,
                                                              "stored_id": old, "current_id": now,
                                                              "action": "reading it from the "
                                                                        "beginning"})
                    record.offsets = {k: v for k, v in record.offsets.items() if k[0] != topic}
                    del record.topic_ids[topic]
        self.handler.install(unit, state)
        self.metrics.restores.labels(self.service,
                                     "restored" if state is not None else "fresh").inc()
        for i in self.handler.inputs(unit):
            record.topic_ids.setdefault(i.topic, self.topic_ids.get(i.topic))
        record.dirty = state is None
        return record

    # ---- input partitions ---------------------------------------------------------------------
    def _partitions(self, topic: str) -> list[int]:
        meta = self.data.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise LooplineError(f"{self.service}: input topic {topic} does not exist; `loopline "
                                "apply` its pipeline first")
        return sorted(meta.partitions)

    def _reassign(self) -> None:
        """Assign every input partition of the owned
        units at the earliest offset one of them needs."""
        wanted: dict[tuple[str, int], int] = {}
        for unit, record in self.units.items():
            for i in self.handler.inputs(unit):
                for p in self._partitions(i.topic):
                    default = OFFSET_BEGINNING if i.start == "beginning" else OFFSET_END
                    offset = record.offsets.get((i.topic, p), default)
                    key = (i.topic, p)
                    wanted[key] = _earliest(wanted.get(key), offset)
        gone = [TopicPartition(t, p) for (t, p) in self._assigned if (t, p) not in wanted]
        if gone:
            self.data.incremental_unassign(gone)
        new = [TopicPartition(t, p, o) for (t, p), o in wanted.items()
               if (t, p) not in self._assigned]
        if new:
            self.data.incremental_assign(new)
        for (t, p), o in wanted.items():
            old = self._assigned.get((t, p))
            if old is not None and _earliest(old, o) != old:
                # a unit that just arrived needs earlier messages
                self.data.seek(TopicPartition(t, p, o))
        self._assigned = wanted

    # ---- batches ------------------------------------------------------------------------------
    def owners(self, topic: str) -> list[str]:
        """The owned units that read ``topic``."""
        return [u for u in self.units if any(i.topic == topic for i in self.handler.inputs(u))]

    def observe(self, batch: Iterable[Message]) -> list[Message]:
        """The messages some owned unit has not folded
        in yet; every unit's offsets move past them."""
        self._before = {u: dict(r.offsets) for u, r in self.units.items()}
        owners: dict[str, list[str]] = {}
        fresh: list[Message] = []
        for m in batch:
            topic = m.topic()
            if topic not in owners:
                owners[topic] = self.owners(topic)
            key, offset = (topic, m.partition()), m.offset()
            keep = False
            for unit in owners[topic]:
                record = self.units[unit]
                if offset >= record.offsets.get(key, -1):
                    record.offsets[key] = offset + 1
                    record.dirty = True
                    keep = True
            if keep:
                fresh.append(m)
        return fresh

    def fresh_for(self, unit: str, m: Message) -> bool:
        """Whether ``m`` (of the batch last observed)
        is new to ``unit`` (for topics units share)."""
        before = self._before.get(unit)
        return before is not None and m.offset() >= before.get((m.topic(), m.partition()), -1)

    def request(self) -> None:
        """Checkpoint at the next round, whatever the
        interval (a decision worth keeping was made)."""
        self._requested = True

    def touch(self, unit: str) -> None:
        """Mark a unit's state changed outside of a batch (timers, registry changes)."""
        record = self.units.get(unit)
        if record is not None:
            record.dirty = True

    # ---- checkpoints (the loop's Checkpointer) ------------------------------------------------
    def due(self, pending: Outputs, now: float) -> bool:
        """Commit when outputs wait (with the state that caused them) or the interval has passed."""
        if pending or self._requested:
            return True
        return now - self._last_checkpoint >= self.checkpoint_interval_s and any(
            r.dirty for r in self.units.values())

    def checkpoint(self, out: Outputs) -> list[TopicPartition]:
        """Queue every changed unit's state; return its
        positions (they fence a zombie's transaction)."""
        size = 0
        for unit, record in self.units.items():
            if not record.dirty:
                continue
            message = self.changelog.record(unit, {"state": self.handler.snapshot(unit),
                                                   "version": getattr(self.handler, "state_version",
                                                                      1),
                                                   "offsets": dict(record.offsets),
                                                   "topic_ids": dict(record.topic_ids)})
            size += len(message.value or b"")
            out.items.append(message)
            record.dirty = False
            self.metrics.checkpoints.labels(self.service).inc()
        if size:
            self.metrics.checkpoint_bytes.labels(self.service).set(size)
        self._last_checkpoint = time.monotonic()
        self._requested = False
        positions: dict[tuple[str, int], int] = {}
        for record in self.units.values():
            for key, offset in record.offsets.items():
                positions[key] = min(positions.get(key, offset), offset)
        return [TopicPartition(t, p, o) for (t, p), o in positions.items()]

    def rollback(self) -> None:
        """An aborted commit: every owned unit goes back to its last committed state."""
        partitions = set(self.partitions)
        self._give_up(partitions)
        self.partitions = partitions
        self._take(partitions)


def _guarded(callback: Callable[[Consumer, list[TopicPartition]], None], consumer: Consumer,
             partitions: list[TopicPartition]) -> None:
    """Run a rebalance callback; an exception escaping
    into librdkafka would be mangled, so log it here."""
    try:
        callback(consumer, partitions)
    except Exception:  # logged with its traceback; the loop notices what it left undone
        log.exception("rebalance_callback_failed", extra={"callback": callback.__name__,
                                                          "partitions": [tp.partition
                                                                         for tp in partitions]})


def _earliest(a: int | None, b: int) -> int:
    """The earlier of two start offsets (OFFSET_BEGINNING before any offset, OFFSET_END after)."""
    if a is None:
        return b
    rank = {OFFSET_BEGINNING: -2, OFFSET_END: float("inf")}
    return a if rank.get(a, a) <= rank.get(b, b) else b
