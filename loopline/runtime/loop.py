"""The one consume loop every service runs: consume what is available, process, commit.

Each round: periodic work (``tick``: follow the registry, timers), then a batch — the loop waits
up to ``batch_timeout_s`` for the first message and then takes only what has already arrived,
so batches close on what is available instead of waiting out a timeout while messages flow —,
then the handler turns it into :class:`~loopline.runtime.outputs.Outputs`, and
:class:`~loopline.runtime.delivery.Delivery` commits outputs and input offsets together.

One error policy, for every service:

- a fatal librdkafka error (or a fenced producer) ends the loop with the exception, so the
  process exits non-zero and its supervisor restarts it;
- retriable consumer errors are logged and the loop goes on;
- a handler that raises on a batch has the batch bisected: each half is processed again with
  fresh outputs, down to single messages; a message that still fails is dead-lettered with the
  error (a poison message never stops a partition, never crash-loops a service);
- an aborted transaction rewinds to the last commit and processes again.

Stateless services commit after every batch. Stateful ones (and sinks) pass a
:class:`Checkpointer` that decides when to commit and which positions its state covers.

On at-least-once, a stateless service under load does not wait for Kafka's acknowledgement of
one large batch before processing the next: it sends the batch's outputs, goes on while they are
acknowledged, and confirms (waits for every acknowledgement, then stores the input offsets of all
batches sent) as soon as no input is waiting, or after ``max_unconfirmed`` messages or
``max_unconfirmed_s``.
The outputs leave at once either way; only the offsets move later. A crash before a
confirmation re-delivers those batches, as a crash before a commit always did.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Histogram

from loopline.errors import ClientStuck, LooplineError
from loopline.kafka import StopFlag
from loopline.observability import Health, bounded
from loopline.runtime.delivery import AtLeastOnce, Delivery, RetryBatch
from loopline.runtime.outputs import Outputs
from loopline.topics import is_event_topic

log = logging.getLogger(__name__)


class Handler(Protocol):
    """What a service plugs into the loop."""

    def process(self, batch: list[Message], out: Outputs) -> None:
        """Turn a batch of data messages into outputs (raise to have the batch bisected)."""

    def tick(self, out: Outputs) -> None:
        """Periodic work between batches (registry, timers); may queue outputs."""


class Checkpointer(Protocol):
    """When a stateful service (or a sink) commits, and which input positions its state covers."""

    def due(self, pending: Outputs, now: float) -> bool:
        """Whether to commit now (``pending`` outputs are waiting)."""

    def checkpoint(self, out: Outputs) -> list[TopicPartition]:
        """Queue the state records on ``out``; return the positions they cover (to commit)."""

    def rollback(self) -> None:
        """An uncommitted transaction was aborted: go back to the last committed state."""


class LoopMetrics:
    """Prometheus metrics of the loop, labelled by service."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.service = service
        self.batches = Counter("loopline_batches", "Batches processed", ["service"],
                               registry=registry)
        self.messages = Counter("loopline_messages", "Input messages processed", ["service"],
                                registry=registry)
        self.poison = Counter("loopline_poison_messages",
                              "Messages the handler failed on, dead-lettered "
                              "after bisecting their batch", ["service"], registry=registry)
        self.bisections = Counter("loopline_bisections", "Batches split because the handler failed",
                                  ["service"], registry=registry)
        self.aborts = Counter("loopline_aborted_commits",
                              "Transactions aborted and processed again",
                              ["service"], registry=registry)
        self.tombstones = Counter("loopline_tombstones_skipped", "Null-valued records on raw and "
                                  "features topics (deletions, not events) passed over",
                                  ["service", "topic"], registry=registry)
        self.commit_seconds = Histogram("loopline_commit_seconds",
                                        "Time to commit outputs and offsets",
                                        ["service"], registry=registry,
                                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                 1, 5))


def data_messages(messages: Sequence[Message]) -> list[Message]:
    """The data messages of a consumed batch; fatal errors raise, others are logged."""
    out = [m for m in messages if m.error() is None]
    if len(out) == len(messages):  # the common case: no error events to look at
        return out
    out = []
    for m in messages:
        err = m.error()
        if err is None:
            out.append(m)
        elif err.code() != KafkaError._PARTITION_EOF:
            if err.fatal():
                raise KafkaException(err)
            log.warning("consume_error", extra={"error": err.str(), "topic": m.topic(),
                                                "partition": m.partition()})
    return out


def consume_available(consumer: Consumer, max_messages: int, timeout_s: float,
                      idle: Callable[[], None] | None = None) -> list[Message]:
    """Up to ``max_messages``: wait up to ``timeout_s`` for the first, then only what has arrived.

    ``idle`` is called before waiting, when nothing has arrived yet.
    """
    messages: list[Any] = consumer.consume(max_messages, 0)
    if not messages:
        if idle is not None:
            idle()
        messages = consumer.consume(1, timeout_s)
        if messages and max_messages > 1:
            messages += consumer.consume(max_messages - 1, 0)
    return messages


def positions_after(batch: Sequence[Message]) -> list[TopicPartition]:
    """Per partition, the offset after the last message of ``batch`` (what to commit).

    A consumer hands out each partition's messages in offset order, so the last is the highest.
    """
    last = {(m.topic(), m.partition()): m.offset() for m in batch}  # later messages overwrite
    return [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]


def positions_before(batch: Sequence[Message]) -> list[TopicPartition]:
    """Per partition, the offset of the first message of ``batch`` (where to rewind)."""
    first: dict[tuple[str, int], int] = {}
    for m in batch:
        key = (m.topic(), m.partition())
        if key not in first or m.offset() < first[key]:
            first[key] = m.offset()
    return [TopicPartition(t, p, o) for (t, p), o in first.items()]


def tune_gc() -> None:
    """Collect garbage rarely, and never walk what the process built before its loop started."""
    # Every message decodes into fresh dicts, so the default threshold (700 allocations) runs a
    # collection every few messages, and every hundredth one walks the whole heap (models,
    # registry state, libraries): 50-250 ms on a busy 2-core machine, which every message behind
    # it waits out (a service's p99 latency). Per-message garbage is acyclic and freed by
    # reference counting anyway.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


@dataclass
class LoopSettings:
    """Batching and timing of the loop."""

    batch_size: int = 1000
    batch_timeout_s: float = 0.05
    tick_s: float = 0.2
    # stateless handlers can be retried on part of a batch; stateful ones cannot
    bisect: bool = True
    # Process-wide: only for a service that owns its process (not a loop on a test's thread).
    tune_gc: bool = False
    # At-least-once, stateless: batches this large (input flows faster than it is handled) go
    # on before their acknowledgement; smaller ones are confirmed at once (waiting on a batch of
    # a few messages would only add latency). And how much may be sent before the wait.
    pipeline_from: int = 100
    max_unconfirmed: int = 5000
    max_unconfirmed_s: float = 0.1


class Loop:
    """Runs a :class:`Handler` on a consumer until ``stop``; see the module docstring."""

    def __init__(self, service: str, consumer: Consumer, delivery: Delivery, handler: Handler,
                 stop: StopFlag, health: Health, metrics: LoopMetrics, settings: LoopSettings,
                 checkpointer: Checkpointer | None = None, max_deadletter_bytes: int | None = None,
                 group: Consumer | None = None) -> None:
        self.service = service
        self.consumer = consumer
        self.group = group or consumer  # whose group metadata fences a transaction
        self.delivery = delivery
        self.handler = handler
        self.stop = stop
        self.health = health
        self.metrics = metrics
        self.settings = settings
        self.checkpointer = checkpointer
        self.max_deadletter_bytes = max_deadletter_bytes
        self.pending = self.outputs()
        self._closing = False
        self._stuck = False
        # Sent, not yet acknowledged (at-least-once, stateless): see the module docstring.
        self._pipelined = checkpointer is None and isinstance(delivery, AtLeastOnce)
        self._unconfirmed: list[Outputs] = []
        self._unconfirmed_positions: dict[tuple[str, int], int] = {}
        self._unconfirmed_count = 0
        self._unconfirmed_since = 0.0

    def outputs(self) -> Outputs:
        """A fresh output buffer for this service."""
        return Outputs(self.service, max_deadletter_bytes=self.max_deadletter_bytes)

    def run(self) -> None:
        """Loop until ``stop``; commit what is pending on the way out (not after a failure)."""
        s = self.settings
        next_tick = 0.0
        failed = False
        if s.tune_gc:
            tune_gc()  # the service has built its long-lived state by now
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + s.tick_s
                    if self.health.broker_suspect():
                        self._probe_broker()
                    self.handler.tick(self.pending)
                if self.group is not self.consumer:
                    # the group's rebalance callbacks (its partitions are paused)
                    self.group.poll(0)
                batch = data_messages(consume_available(
                    self.consumer, s.batch_size, s.batch_timeout_s,
                    self._confirm_idle if self._unconfirmed else None))
                self.health.beat()
                events = self._without_tombstones(batch) if self._has_tombstones(batch) else batch
                if events:
                    self.health.busy()
                    self.metrics.batches.labels(self.service).inc()
                    self.metrics.messages.labels(self.service).inc(len(events))
                    self.pending.extend(self._process(events))
                try:
                    self._commit(batch)
                except RetryBatch as e:
                    self._rewind(batch, str(e))
                self.health.idle()
                if not batch and not self.pending:
                    self.delivery.poll()
        except ClientStuck:
            failed = self._stuck = True
            raise
        except BaseException:
            failed = True
            raise
        finally:
            self._close(failed)

    @staticmethod
    def _has_tombstones(batch: list[Message]) -> bool:
        return any(m.value() is None for m in batch)

    def _without_tombstones(self, batch: list[Message]) -> list[Message]:
        """The batch without the tombstones of event topics, counted (committed with the batch)."""
        kept = []
        for m in batch:
            topic = m.topic() or ""
            if m.value() is None and is_event_topic(topic):
                self.metrics.tombstones.labels(self.service, topic).inc()
                log.debug("tombstone_skipped", extra={"service": self.service, "topic": topic,
                                                      "partition": m.partition(),
                                                      "offset": m.offset()})
            else:
                kept.append(m)
        return kept

    def _probe_broker(self) -> None:
        """After a broker error, a metadata request tells whether it is back (readiness follows)."""
        try:
            self.consumer.list_topics(timeout=1.0)
        except KafkaException:
            return
        self.health.broker_ok()

    def _process(self, batch: list[Message]) -> Outputs:
        out = self.outputs()
        try:
            self.handler.process(batch, out)
            return out
        except (KafkaException, RetryBatch):
            raise
        except Exception as e:
            if not self.settings.bisect:
                raise
            if len(batch) == 1:
                return self._poison(batch[0], e)
            self.metrics.bisections.labels(self.service).inc()
            log.warning("batch_bisected", extra={"service": self.service, "messages": len(batch),
                                                 "error": bounded(f"{type(e).__name__}: {e}")})
            middle = len(batch) // 2
            out = self._process(batch[:middle])
            out.extend(self._process(batch[middle:]))
            return out

    def _poison(self, m: Message, error: Exception) -> Outputs:
        """Dead-letter the one message the handler fails on."""
        self.metrics.poison.labels(self.service).inc()
        reason = f"{self.service} failed to process this message: {type(error).__name__}: {error}"
        log.error("poison_message",
                  exc_info=error if not isinstance(error, LooplineError) else None,
                  extra={"service": self.service, "topic": m.topic(), "partition": m.partition(),
                         "offset": m.offset(), "error": bounded(str(error))})
        out = self.outputs()
        out.dead(m, "internal", reason)
        return out

    def _commit(self, batch: list[Message]) -> None:
        held = self.pending.held
        if self.checkpointer is None:
            if not batch and not self.pending:
                return
            positions = positions_after(batch)
            if self._pipelined and not held and len(batch) >= self.settings.pipeline_from:
                self._send(positions)
                return
            self._confirm()  # what was sent before goes first
            if held:  # commit only up to what the handler kept for later
                keep = {(tp.topic, tp.partition): tp.offset for tp in held}
                positions = [tp for tp in positions if (tp.topic, tp.partition) not in keep]
                positions += [TopicPartition(t, p, o) for (t, p), o in keep.items()]
        else:
            if not self.checkpointer.due(self.pending, time.monotonic()):
                return
            positions = self.checkpointer.checkpoint(self.pending)
        started = time.perf_counter()
        if self.group is not self.consumer and not self.delivery.exactly_once:
            # a stateful service's positions live in its state; only transactions need them
            positions = []
        self.delivery.commit(self.pending.items, positions, self.group)
        self.metrics.commit_seconds.labels(self.service).observe(time.perf_counter() - started)
        self.health.broker_ok()
        self.pending.committed()
        self.pending = self.outputs()
        if held:
            for tp in held:
                self.consumer.seek(tp)
            self.consumer.pause([TopicPartition(tp.topic, tp.partition) for tp in held])

    def _send(self, positions: list[TopicPartition]) -> None:
        """Send the pending outputs; confirm them later (see the module docstring)."""
        assert isinstance(self.delivery, AtLeastOnce)
        pending, s = self.pending, self.settings
        self.delivery.send(pending.items)
        pending.sent()
        now = time.monotonic()
        if not self._unconfirmed:
            self._unconfirmed_since = now
        self._unconfirmed.append(pending)
        self._unconfirmed_count += len(pending.items) + 1
        for tp in positions:  # a later batch's position of a partition replaces an earlier one
            self._unconfirmed_positions[(tp.topic, tp.partition)] = tp.offset
        self.pending = self.outputs()
        if (self._unconfirmed_count >= s.max_unconfirmed
                or now - self._unconfirmed_since >= s.max_unconfirmed_s):
            self._confirm()

    def _confirm_idle(self) -> None:
        """Confirm while no input waits (a stuck broker can make that long: health sees it)."""
        self.health.busy()
        self._confirm()
        self.health.idle()

    def _confirm(self) -> None:
        """Wait for the acknowledgement of everything sent; store the input offsets it covers."""
        if not self._unconfirmed:
            return
        assert isinstance(self.delivery, AtLeastOnce)
        started = time.perf_counter()
        positions = [TopicPartition(t, p, o) for (t, p), o in self._unconfirmed_positions.items()]
        self.delivery.confirm(positions, self.group)
        self.metrics.commit_seconds.labels(self.service).observe(time.perf_counter() - started)
        self.health.broker_ok()
        confirmed, self._unconfirmed = self._unconfirmed, []
        self._unconfirmed_positions = {}
        self._unconfirmed_count = 0
        for outputs in confirmed:
            outputs.committed()

    def commit_now(self) -> None:
        """Commit what is pending with a checkpoint, now (a stateful service handing units over)."""
        if self.checkpointer is None or self._closing:
            return
        positions = self.checkpointer.checkpoint(self.pending)
        if self.group is not self.consumer and not self.delivery.exactly_once:
            positions = []
        self.delivery.commit(self.pending.items, positions, self.group)
        self.pending.committed()
        self.pending = self.outputs()

    def _rewind(self, batch: list[Message], reason: str) -> None:
        """Go back to the last commit after an aborted transaction and process again."""
        self.metrics.aborts.labels(self.service).inc()
        log.warning("commit_aborted", extra={"service": self.service, "reason": reason})
        self.pending = self.outputs()
        if self.checkpointer is not None:
            self.checkpointer.rollback()
            return
        for tp in positions_before(batch):
            self.consumer.seek(tp)

    def _close(self, failed: bool) -> None:
        if self._stuck:
            return  # a client that hung cannot be trusted to close either: the process exits now
        try:
            if not failed and not self.stop_unclean():
                try:
                    self._commit_final()
                except (KafkaException, LooplineError, RetryBatch) as e:
                    log.warning("final_commit_failed",
                                extra={"service": self.service, "error": str(e)})
            self._closing = True
            self.delivery.close()
        finally:
            self._closing = True
            try:
                if self.group is not self.consumer:
                    # first: leaving the group revokes units, which unassigns inputs
                    self.group.close()
            finally:
                self.consumer.close()

    def stop_unclean(self) -> bool:
        """Whether the loop stopped without being asked to (nothing to commit then)."""
        return not self.stop.is_set()

    def _commit_final(self) -> None:
        self._confirm()
        if self.checkpointer is not None:
            positions = self.checkpointer.checkpoint(self.pending)
        elif self.pending:
            positions = []
        else:
            return
        self.delivery.commit(self.pending.items, positions, self.group)
        self.pending.committed()
        self.pending = self.outputs()
