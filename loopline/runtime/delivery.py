"""How a batch's outputs and its input offsets reach Kafka: exactly once, or at least once.

- :class:`ExactlyOnce` (Apache Kafka): one transaction per commit — produce the outputs, send
  the input offsets to the transaction with the consumer group's metadata, commit. A crash
  before the commit aborts everything; ``read_committed`` readers never see a partial batch,
  and a zombie is fenced by its transactional id and the group generation (KIP-447).
- :class:`AtLeastOnce` (brokers without transactions, such as the embedded Tansu): produce the
  outputs, wait until Kafka acknowledged every one, and only then store the input offsets. A
  crash re-delivers the batch; deterministic ids make every sink idempotent.

The loop calls :meth:`Delivery.commit` once per batch (stateless services) or per checkpoint
(stateful ones); it never produces outside it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from loopline.errors import ClientStuck, DeliveryError
from loopline.kafka import release_producer
from loopline.runtime.outputs import Out

log = logging.getLogger(__name__)


class RetryBatch(Exception):
    """The transaction was aborted (an abortable Kafka error): re-process from the last commit."""


class Failures:
    """Delivery failures, as the producer reports them (pass it as the producer's ``on_delivery``).

    Successes need no report: ``flush()`` returning 0 proves nothing is left unacknowledged, so
    the runtime's producers report only errors (``delivery.report.only.error``) to this one
    callback, set in their configuration: a callback per message costs more than its produce.
    """

    def __init__(self) -> None:
        self._items: list[str] = []

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._items.append(f"{msg.topic()}: {err.str()}")

    def take(self) -> list[str]:
        """The failures reported since the last call."""
        items, self._items = self._items, []
        return items


class Delivery:
    """Sends outputs and commits input offsets; see the module docstring."""

    exactly_once = False

    def __init__(self, producer: Producer, timeout_s: float = 30.0,
                 failures: Failures | None = None) -> None:
        """``failures``: the producer's configured ``on_delivery`` (else each message gets one)."""
        self.producer = producer
        self.timeout_s = timeout_s
        self.failures = failures or Failures()
        self._callback = None if failures is not None else self.failures

    def _produce(self, outs: Sequence[Out]) -> None:
        produce, callback = self.producer.produce, self._callback
        for o in outs:
            try:  # the common case, without a dict of arguments per message
                if o.headers is not None or o.partition is not None:
                    self._produce_one(o)
                elif callback is None:
                    produce(o.topic, o.value, o.key)
                else:
                    produce(o.topic, o.value, o.key, on_delivery=callback)
            except BufferError:  # librdkafka's queue is full: let it drain
                self.producer.poll(0.05)
                self._produce_one(o)

    def _produce_one(self, o: Out) -> None:
        kwargs: dict[str, Any] = {"key": o.key, "headers": o.headers}
        if self._callback is not None:
            kwargs["on_delivery"] = self._callback
        if o.partition is not None:
            kwargs["partition"] = o.partition
        while True:
            try:
                self.producer.produce(o.topic, o.value, **kwargs)
                return
            except BufferError:
                self.producer.poll(0.05)

    def commit(self, outs: Sequence[Out], offsets: Sequence[TopicPartition],
               consumer: Consumer | None) -> None:
        """Make ``outs`` visible and ``offsets`` committed, together; raise if Kafka refused."""
        raise NotImplementedError

    def poll(self) -> None:
        """Serve delivery callbacks (call when idle)."""
        self.producer.poll(0)

    def close(self) -> None:
        """Flush what is left (an open transaction is aborted), then close the producer."""
        self.producer.flush(10)
        release_producer(self.producer)  # a Loop outlives its run (its consumer's callbacks)


class AtLeastOnce(Delivery):
    """Produce, wait for every acknowledgement, then store the offsets (auto-committed).

    The two halves can also run apart (:meth:`send`, then :meth:`confirm`): the loop sends a
    batch's outputs and goes on with the next batch while Kafka acknowledges them, and confirms
    (waits, then stores the offsets of every batch sent so far) once input runs dry or a bound is
    reached. Offsets are still stored only after everything before them was acknowledged.
    """

    def commit(self, outs: Sequence[Out], offsets: Sequence[TopicPartition],
               consumer: Consumer | None) -> None:
        """See :meth:`Delivery.commit`."""
        self.send(outs)
        self.confirm(offsets, consumer, bool(outs))

    def send(self, outs: Sequence[Out]) -> None:
        """Hand ``outs`` to the producer without waiting for Kafka's acknowledgement."""
        if outs:
            self._produce(outs)
            self.producer.poll(0)  # serve error reports; never blocks

    def confirm(self, offsets: Sequence[TopicPartition], consumer: Consumer | None,
                sent: bool = True) -> None:
        """Wait until Kafka acknowledged everything sent, then store ``offsets``; raise if not."""
        remaining = self.producer.flush(self.timeout_s) if sent or len(self.producer) else 0
        failures = self.failures.take()
        if remaining:
            raise DeliveryError(f"{remaining} message(s) not acknowledged within "
                                f"{self.timeout_s:.0f}s")
        if failures:
            raise DeliveryError(f"{len(failures)} message(s) failed delivery, first: {failures[0]}")
        if consumer is not None and offsets:
            try:
                consumer.store_offsets(offsets=list(offsets))
            except KafkaException as e:
                # Partitions revoked since the batch was read: the new owner re-reads them.
                log.info("offsets_not_stored", extra={"error": e.args[0].str()})


class ExactlyOnce(Delivery):
    """One Kafka transaction per commit (outputs + input offsets).

    Transactions take turns over ``producers`` (each with its own transactional id). After a
    commit, the coordinator still writes the transaction's markers, and it answers the same
    producer's next transaction with CONCURRENT_TRANSACTIONS until they are written. One message
    per transaction, back to back on a local Kafka: 12-29 ms per transaction with one producer,
    5-6 ms with two (p50). Transactions still run one at a time, so outputs and offsets keep
    their order.
    """

    exactly_once = True

    def __init__(self, producers: Sequence[Producer], timeout_s: float = 30.0,
                 failures: Failures | None = None) -> None:
        super().__init__(producers[0], timeout_s, failures)
        self._producers = list(producers)
        self._turn = 0
        for producer in self._producers:
            # Aborts whatever an earlier incarnation with the same transactional.id left open.
            producer.init_transactions(timeout_s)
        self._open = False

    def commit(self, outs: Sequence[Out], offsets: Sequence[TopicPartition],
               consumer: Consumer | None) -> None:
        """See :meth:`Delivery.commit`."""
        if not outs and not offsets:
            return
        try:
            if not self._open:
                self.producer.begin_transaction()
                self._open = True
            if outs:
                self._produce(outs)
            if offsets and consumer is not None:
                self._bounded("send_offsets_to_transaction",
                              self.producer.send_offsets_to_transaction,
                              list(offsets), consumer.consumer_group_metadata(), self.timeout_s)
            self._commit_retrying()
        except KafkaException as e:
            err = e.args[0]
            if err.txn_requires_abort():
                self.abort()
                raise RetryBatch(err.str()) from e
            raise
        failures = self.failures.take()
        if failures:  # cannot happen after a successful commit; kept as a guard
            raise DeliveryError(f"{len(failures)} message(s) failed delivery, first: {failures[0]}")

    def _bounded(self, what: str, call: Callable[..., Any], *args: Any) -> None:
        """``call(*args)`` on a helper thread; raise
        :class:`ClientStuck` if it outlives its timeout."""
        done = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            try:
                call(*args)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                error.append(e)
            finally:
                done.set()

        threading.Thread(target=run, name=f"txn-{what}", daemon=True).start()
        if not done.wait(self.timeout_s + 10):
            raise ClientStuck(f"{what} did not return within {self.timeout_s:.0f}s "
                              "(librdkafka#5456, after the group or transaction coordinator "
                              "went away); starting over")
        if error:
            raise error[0]

    def _commit_retrying(self) -> None:
        while True:
            try:
                self._bounded("commit_transaction", self.producer.commit_transaction,
                              self.timeout_s)
                self._open = False
                self._turn = (self._turn + 1) % len(self._producers)
                self.producer = self._producers[self._turn]
                return
            except KafkaException as e:
                if not e.args[0].retriable():
                    raise
                log.warning("commit_retry", extra={"error": e.args[0].str()})

    def abort(self) -> None:
        """Abort the open transaction, if any (its outputs are never visible)."""
        if self._open:
            try:
                self.producer.abort_transaction(self.timeout_s)
            finally:
                self._open = False
                self.failures.take()

    def poll(self) -> None:
        """See :meth:`Delivery.poll`."""
        for producer in self._producers:
            producer.poll(0)

    def close(self) -> None:
        """Abort an open transaction (nothing half-done becomes visible), flush, close all."""
        try:
            self.abort()
        except KafkaException as e:
            log.warning("abort_failed", extra={"error": e.args[0].str()})
        for producer in self._producers:
            producer.flush(10)
            release_producer(producer)
