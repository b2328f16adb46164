"""The runtime's one consume loop on the real broker: commit and restart, poison messages, fatal
errors, aborted work, and (on Kafka) transactions a read_committed reader sees whole or not at
all."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Message
from services_harness import failing_delivery

from loopline import avro
from loopline.apply import ensure_global_topics
from loopline.errors import DeliveryError
from loopline.kafka import AckedProducer, KafkaConfig
from loopline.runtime.delivery import Delivery
from loopline.runtime.outputs import Outputs
from loopline.runtime.service import ServiceRuntime
from loopline.settings import LooplineSettings, ServiceSettings

pytestmark = pytest.mark.integration


def produce(kafka: KafkaConfig, topic: str, values: list[bytes]) -> None:
    producer = AckedProducer(kafka.producer("test-producer"))
    for i, v in enumerate(values):
        producer.send(topic, v, key=str(i).encode())
    producer.confirm()


def drain(kafka: KafkaConfig, topic: str, group: str, expect: int, timeout_s: float = 30.0,
          settle_s: float = 0.5) -> list[Message]:
    """Read with a (read_committed) group until ``expect``
    messages, then a little longer for extras."""
    consumer = kafka.consumer("test-drain", group)
    consumer.subscribe([topic])
    got: list[Message] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < expect and time.monotonic() < deadline:
            got += [m for m in consumer.consume(500, 0.2) if m.error() is None]
        settle = time.monotonic() + settle_s
        while time.monotonic() < settle:
            got += [m for m in consumer.consume(500, 0.2) if m.error() is None]
    finally:
        consumer.close()
    return got


class Upper:
    """A handler: each message upper-cased to the sink;
    ``poison`` values raise; ``fatal`` raises a fatal error."""

    def __init__(self, sink: str, poison: set[bytes] = frozenset(),
                 fatal: bytes | None = None) -> None:  # type: ignore[assignment]  # a frozenset default
        self.sink, self.poison, self.fatal = sink, poison, fatal
        self.seen: list[bytes] = []

    def process(self, batch: list[Message], out: Outputs) -> None:
        for m in batch:
            value = m.value()
            if value == self.fatal:
                raise KafkaException(KafkaError(KafkaError._FATAL, "injected fatal error",
                                                fatal=True))
            if value in self.poison:
                raise ValueError(f"cannot handle {value!r}")
            out.send(self.sink, value.upper(), key=m.key())
        self.seen += [m.value() for m in batch]

    def tick(self, out: Outputs) -> None:
        pass


class Running:
    """The loop on a thread, in a consumer group, with a runtime of its own."""

    def __init__(self, settings: LooplineSettings, source: str, handler: Upper, group: str,
                 delivery: Callable[[ServiceRuntime], Delivery] | None = None) -> None:
        self.settings = ServiceSettings(bootstrap_servers=settings.bootstrap_servers,
                                        home=settings.home, kafka_profile=settings.kafka_profile,
                                        session_timeout_ms=6000,
                                        group_id=group, instance_id=group, batch_size=100)
        self.rt = ServiceRuntime("test", self.settings, install_signals=False)
        self.handler = handler
        consumer = self.rt.kafka.consumer("test-loop", group)
        consumer.subscribe([source])
        self.loop = self.rt.loop(consumer, delivery(self.rt) if delivery else self.rt.delivery(),
                                 handler)
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with self.rt:
                self.loop.run()
        except BaseException as e:  # noqa: BLE001 - surfaced to the test
            self.errors.append(e)

    def stop(self) -> None:
        self.rt.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_round_trip_commit_restart_no_redelivery(settings: LooplineSettings, kafka: KafkaConfig,
                                                 make_topic: Any,
                                                unique: str) -> None:
    source, sink = make_topic(partitions=3), make_topic(partitions=3)
    values = [f"event-{i}".encode() for i in range(500)]
    produce(kafka, source, values)
    first = Running(settings, source, Upper(sink), f"{unique}-g")
    wait_for(lambda: len(first.handler.seen) >= 500)
    first.stop()
    assert not first.errors and sorted(first.handler.seen) == sorted(values)

    # Restart in the same group: committed input must not come back.
    produce(kafka, source, [b"late-1", b"late-2"])
    second = Running(settings, source, Upper(sink), f"{unique}-g")
    wait_for(lambda: len(second.handler.seen) >= 2)
    time.sleep(1.0)  # anything redelivered would arrive with the first fetch
    second.stop()
    assert sorted(second.handler.seen) == [b"late-1", b"late-2"]
    out = drain(kafka, sink, f"{unique}-check", expect=502)
    assert sorted(m.value() for m in out) == sorted(v.upper()
                                                    for v in [*values, b"late-1", b"late-2"])



def test_outputs_keep_the_input_order_across_batches(
        settings: LooplineSettings, kafka: KafkaConfig, make_topic: Any, unique: str) -> None:
    # On Kafka, consecutive transactions take turns over two producers: each must be committed
    # before the next one's outputs go out, or a partition's outputs would be reordered.
    source, sink = make_topic(partitions=1), make_topic(partitions=1)
    values = [f"o{i:04d}".encode() for i in range(1000)]
    produce(kafka, source, values)
    running = Running(settings, source, Upper(sink), f"{unique}-g")
    out = drain(kafka, sink, f"{unique}-check", expect=len(values))
    running.stop()
    assert not running.errors
    assert [m.value() for m in out] == [v.upper() for v in values]
    transactions = running.rt.registry.get_sample_value("loopline_batches_total",
                                                        {"service": "test"})
    assert transactions is not None and transactions >= 10  # batches of at most 100

def test_a_poison_message_is_dead_lettered_and_the_rest_go_through(
        settings: LooplineSettings, kafka: KafkaConfig, make_topic: Any, unique: str) -> None:
    source, sink = make_topic(), make_topic()
    # dead letters of a topic that belongs to no pipeline go to loopline.deadletter
    ensure_global_topics(kafka)
    values = [f"v{i}".encode() for i in range(300)]
    poison = {b"v17", b"v150", b"v151", b"v299"}
    produce(kafka, source, values)
    running = Running(settings, source, Upper(sink, poison), f"{unique}-g")
    dead = drain(kafka, "loopline.deadletter", f"{unique}-dead", expect=4, timeout_s=60)
    running.stop()
    assert not running.errors
    mine = [avro.codec("deadletter").decode(m.value()) for m in dead]
    mine = [d for d in mine if d["source"]["topic"] == source]
    assert sorted(d["original"] for d in mine) == sorted(poison)
    assert all(d["rule"] == "internal" and "cannot handle" in d["message"]
               and d["service"] == "test"
               for d in mine)
    out = drain(kafka, sink, f"{unique}-check", expect=296)
    assert sorted(m.value() for m in out) == sorted(v.upper() for v in values if v not in poison)
    assert running.rt.registry.get_sample_value("loopline_poison_messages_total",
                                                {"service": "test"}) == 4


def test_a_fatal_error_stops_the_loop_with_nothing_committed(
        settings: LooplineSettings, kafka: KafkaConfig, make_topic: Any, unique: str) -> None:
    source, sink = make_topic(), make_topic()
    produce(kafka, source, [b"a", b"b", b"stop", b"c"])
    running = Running(settings, source, Upper(sink, fatal=b"stop"), f"{unique}-g")
    running.thread.join(60)
    assert running.errors and isinstance(running.errors[0], KafkaException)
    assert running.errors[0].args[0].fatal()
    # The next run of the group reads the failed batch again: nothing was lost.
    second = Running(settings, source, Upper(sink), f"{unique}-g")
    wait_for(lambda: b"stop" in second.handler.seen)
    second.stop()
    assert {b"a", b"b", b"stop", b"c"} <= set(second.handler.seen)


def test_a_failed_commit_loses_nothing_and_read_committed_readers_see_each_output_once_on_kafka(
        settings: LooplineSettings, kafka: KafkaConfig, make_topic: Any, unique: str) -> None:
    source, sink = make_topic(), make_topic()
    values = [f"w{i}".encode() for i in range(200)]
    produce(kafka, source, values)
    first = Running(settings, source, Upper(sink), f"{unique}-g", delivery=failing_delivery(1))
    first.thread.join(60)
    assert first.errors and isinstance(first.errors[0], DeliveryError)
    second = Running(settings, source, Upper(sink), f"{unique}-g")
    wait_for(lambda: len(second.handler.seen) >= 1)
    out = drain(kafka, sink, f"{unique}-check", expect=200, settle_s=1.0)
    second.stop()
    got = sorted(m.value() for m in out)
    assert set(got) == {v.upper() for v in values}, "nothing lost"
    if kafka.exactly_once:
        assert len(got) == 200, (
            "the aborted transaction's outputs are invisible to read_committed readers")
    else:
        assert len(got) >= 200  # at least once: the unacknowledged batch came again



class Recording(Upper):
    """Upper, noting for each batch which earlier batches were not committed when it arrived.

    The first batch is held until ``go`` is set, so that the next one waits in the consumer.
    """

    def __init__(self, sink: str) -> None:
        super().__init__(sink)
        self.go = threading.Event()
        self.committed: list[int] = []
        self.uncommitted_at_arrival: list[list[int]] = []
        self.sizes: list[int] = []

    def process(self, batch: list[Message], out: Outputs) -> None:
        number = len(self.sizes)
        self.uncommitted_at_arrival.append([n for n in range(number) if n not in self.committed])
        self.sizes.append(len(batch))
        if number == 0:
            assert self.go.wait(30)
        super().process(batch, out)
        out.on_commit(lambda: self.committed.append(number))


def test_a_small_batch_is_committed_before_the_next_is_handled(
        settings: LooplineSettings, kafka: KafkaConfig, make_topic: Any, unique: str) -> None:
    # Under load the loop sends large batches and confirms them later. A batch of a few messages
    # (a quiet stream) must be committed before the loop goes on, even with input waiting: its
    # latency is its commit's.
    source, sink = make_topic(partitions=1), make_topic()
    handler = Recording(sink)
    running = Running(settings, source, handler, f"{unique}-g")
    try:
        produce(kafka, source, [b"q0"])
        wait_for(lambda: len(handler.sizes) == 1)
        produce(kafka, source, [b"q1", b"q2"])  # arrives while q0 is being handled
        time.sleep(1.0)  # fetched by then: it waits in the consumer
        handler.go.set()
        wait_for(lambda: sum(handler.sizes) == 3 and len(handler.committed) == len(handler.sizes))
    finally:
        handler.go.set()
        running.stop()
    assert not running.errors
    assert handler.sizes[0] == 1 and len(handler.sizes) >= 2, handler.sizes
    assert handler.uncommitted_at_arrival == [[] for _ in handler.sizes], (
        handler.uncommitted_at_arrival)
