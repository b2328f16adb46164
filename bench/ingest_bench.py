"""Ingest throughput as a ratio to a raw consume->produce loop on the same broker, same run.

Run: ``.venv/bin/python -m bench.ingest_bench [--engine tansu|kafka] [--messages N] [--batch-size B]
[--rounds R]``. Starts its own broker (``--engine``; the service runs at-least-once on both, like
the raw loops). Each of R rounds applies a fresh pipeline, writes N raw events
(95 % valid JSON, 5 % assorted bad input) to its raw topic, then runs (a) raw loops that consume
them and produce each value unchanged to a fresh topic (a lean one, and the one issue #18
measured) and (b) the ingest service loop, with the same batch size, each in a fresh consumer
group. The clock runs from the first handled batch to the last message (group joins are
excluded). Reports, per round and as the median of the rounds' ratios, the wall-clock throughput
ratio and the same ratio in CPU time per message (steadier on a shared machine: the loops of a
round run seconds apart, so they see about the same machine). Goal: ingest >= 60 % of the raw loop.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import KafkaError, Message

from bench.common import add_engine_argument, bench_broker
from loopline.apply import apply_spec
from loopline.errors import DeliveryError
from loopline.kafka import AckedProducer, KafkaConfig, StopFlag, TopicSpec, ensure_topics
from loopline.runtime.loop import positions_after
from loopline.runtime.service import ServiceRuntime
from loopline.services.ingest import IngestService, IngestSettings
from loopline.spec import load_spec

REPO = Path(__file__).resolve().parent.parent
GOOD = {
    "customer_id": "c1",
    "amount": 12.5,
    "merchant_risk": 0.2,
    "hour": 3,
    "country": "DE",
    "card_present": True,
    "device_age_days": 40,
}
BAD = [
    b'{"features": {"amount": 1',
    b'{"features": {"amount": "12"}}',
    b"[1,2]",
    b'{"features": {"customer_id": "c", "amount": NaN}}',
]


def events(n: int, seed: int = 1) -> list[bytes]:
    """N raw messages: 95 % valid JSON events with varying values, 5 % bad input."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if rng.random() < 0.05:
            out.append(rng.choice(BAD))
        else:
            f = dict(
                GOOD,
                customer_id=f"cust-{rng.randrange(1000)}",
                amount=round(rng.uniform(0, 5000), 2),
                merchant_risk=rng.random(),
                hour=rng.randrange(24),
            )
            out.append(orjson.dumps({"features": f, "ts": 1_700_000_000_000 + i}))
    return out


class Clock:
    """Counts handled messages; time from the first batch to the target count."""

    def __init__(self, target: int, stop: StopFlag) -> None:
        self.target, self.stop = target, stop
        self.count, self.first, self.last, self.cpu_first, self.cpu_last = 0, 0.0, 0.0, 0.0, 0.0

    def wrap(self, handle: Callable[[list[Message]], None]) -> Callable[[list[Message]], None]:
        def timed(batch: list[Message]) -> None:
            if not self.first:
                self.first, self.cpu_first = time.perf_counter(), time.process_time()
            handle(batch)
            self.count += len(batch)
            self.last, self.cpu_last = time.perf_counter(), time.process_time()
            if self.count >= self.target:
                self.stop.set()

        return timed

    @property
    def rate(self) -> float:
        """Messages per wall-clock second, first batch to last (the first batch's time excluded)."""
        return self.count / (self.last - self.first) if self.last > self.first else 0.0

    @property
    def cpu_us(self) -> float:
        """CPU microseconds of this process (all its threads) per message: steadier when busy."""
        return (self.cpu_last - self.cpu_first) / self.count * 1e6 if self.count else 0.0


def raw_loop(
    kafka: KafkaConfig,
    source: str,
    sink: str,
    n: int,
    batch_size: int,
    group: str,
    lean: bool = True,
) -> Clock:
    """The limit: a bare confluent-kafka loop that consumes, produces every value unchanged, waits
    for the acknowledgements and stores the offsets (what any at-least-once service must do).

    ``lean``: as lean as such a loop gets, librdkafka reports only failures (to the producer's one
    callback) and produce takes positional arguments. Otherwise the loop issue #18 measured:
    Loopline's ``AckedProducer``, a Python delivery callback for every message.
    """
    stop = StopFlag()
    consumer = kafka.consumer("bench-raw", group)
    consumer.subscribe([source])
    failures: list[str] = []

    def on_error(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            failures.append(err.str())

    clock = Clock(n, stop)
    if lean:
        producer = kafka.producer(
            "bench-raw", **{"delivery.report.only.error": True, "on_delivery": on_error}
        )

        def handle(batch: list[Message]) -> None:
            produce = producer.produce
            for m in batch:
                produce(sink, m.value(), m.key())
            if producer.flush(30) or failures:
                raise DeliveryError(f"raw loop: not acknowledged: {failures[:1]}")
            consumer.store_offsets(offsets=positions_after(batch))
    else:
        acked = AckedProducer(kafka.producer("bench-raw"))

        def handle(batch: list[Message]) -> None:
            send = acked.send
            for m in batch:
                send(sink, m.value(), key=m.key())
            acked.confirm()
            consumer.store_offsets(offsets=positions_after(batch))

    timed = clock.wrap(handle)
    try:
        while not stop.is_set():
            batch = [m for m in consumer.consume(batch_size, 0.05) if m.error() is None]
            if batch:
                timed(batch)
    finally:
        consumer.close()
    return clock


def ingest_loop(kafka: KafkaConfig, pipeline: str, n: int, batch_size: int, group: str) -> Clock:
    """Run the ingest service until it handled n messages; return the clock."""
    settings = IngestSettings(
        bootstrap_servers=kafka.settings.bootstrap_servers,
        kafka_profile=kafka.settings.kafka_profile,
        session_timeout_ms=6000,
        pipelines=[pipeline],
        batch_size=batch_size,
        batch_timeout_s=0.05,
        home=kafka.settings.home,
        group_id=group,
        instance_id=group,
        # Like for like with the raw loops (Kafka's 'auto' would be transactions).
        delivery="at-least-once",
    )
    rt = ServiceRuntime("ingest", settings, install_signals=False)
    service = IngestService(rt, settings)
    clock = Clock(n, rt.stop)
    process = service.process

    def timed(batch: list[Message], out: Any) -> None:
        clock.wrap(lambda b: process(b, out))(batch)

    service.process = timed  # type: ignore[method-assign]  # a test double
    with rt:
        service.run()
    return clock


def main() -> None:
    """Run the benchmark and print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    add_engine_argument(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home, bench_broker(args.engine, Path(home)) as broker:
        kafka = broker.kafka()
        base = load_spec(REPO / "examples" / "fraud.yaml")
        values = events(args.messages)
        rates: dict[str, list[float]] = {"lean": [], "acked": [], "ingest": []}
        cpu: dict[str, list[float]] = {"lean": [], "acked": [], "ingest": []}
        for r in range(args.rounds):
            # Fresh topics every round for every loop: Tansu slows down as a partition's batches
            # pile up.
            spec = base.model_copy(update={"name": f"bench{r}", "partitions": 3})
            apply_spec(kafka, spec)
            sinks = {"lean": f"bench.copy.{r}", "acked": f"bench.acked.{r}"}
            ensure_topics(kafka.admin(), [TopicSpec(t, spec.partitions) for t in sinks.values()])
            print(
                f"round {r + 1}: producing {args.messages} raw events to {spec.topics.raw}...",
                flush=True,
            )
            producer = AckedProducer(kafka.producer("bench-load"))
            for i, value in enumerate(values):
                producer.send(spec.topics.raw, value, key=str(i % 1000).encode())
            producer.confirm()
            for name, sink in sinks.items():
                raw = raw_loop(
                    kafka,
                    spec.topics.raw,
                    sink,
                    args.messages,
                    args.batch_size,
                    f"{name}-{r}",
                    lean=name == "lean",
                )
                rates[name].append(raw.rate)
                cpu[name].append(raw.cpu_us)
                print(f"round {r + 1}: raw loop, {name:5s}  {raw.rate:9,.0f} msg/s  "
                      f"{raw.cpu_us:5.1f} CPU us/msg", flush=True)
            ing = ingest_loop(kafka, spec.name, args.messages, args.batch_size, f"ingest-{r}")
            rates["ingest"].append(ing.rate)
            cpu["ingest"].append(ing.cpu_us)
            shares = "; ".join(f"{name}: {ing.rate / rates[name][-1]:.0%}, CPU "
                               f"{cpu[name][-1] / ing.cpu_us:.0%}" for name in sinks)
            print(f"round {r + 1}: ingest            {ing.rate:9,.0f} msg/s  {ing.cpu_us:5.1f} "
                  f"CPU us/msg ({shares})", flush=True)
        med = statistics.median
        for name, what in (
            ("lean", "the lean raw loop (only failures reported)"),
            ("acked", "the raw loop of issue #18 (a delivery callback per message)"),
        ):
            wall = med(i / raw for i, raw in zip(rates["ingest"], rates[name]))
            cpu_ratio = med(raw / i for i, raw in zip(cpu["ingest"], cpu[name]))
            print(f"result: ingest at {wall:.0%} of {what}, {cpu_ratio:.0%} in CPU time per "
                  f"message (goal >= 60%; medians of {args.rounds} rounds' ratios; ingest "
                  f"{med(rates['ingest']):,.0f} msg/s and {med(cpu['ingest']):.1f} CPU us/msg, raw "
                  f"{med(rates[name]):,.0f} msg/s and {med(cpu[name]):.1f} CPU us/msg; "
                  f"{args.messages} messages, batch size {args.batch_size})", flush=True)


if __name__ == "__main__":
    main()
