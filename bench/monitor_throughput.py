"""Monitor throughput as a ratio to a raw consume loop over the same messages, same broker, same run.

Run: ``.venv/bin/python -m bench.monitor_throughput [--events N] [--rounds R]``.

Starts its own embedded broker, applies examples/fraud.yaml (7 features; adwin + page_hinkley per
numeric feature, ddm on errors, window 1000), registers a champion and a challenger with a
reference profile, and writes N feature events, 2N predictions (champion and challenger) and N/2
feedback records once. Then, per round, in fresh consumer groups:

- raw: consume every message of the three topics and count it (the broker-side limit);
- monitor: the monitor's hot path on the same messages (consume, decode, quality, online
  detectors, windowed PSI/KS, join, alerts): ``MonitorService.handle`` as ``run`` calls it;
- handle only: the same ``handle`` on messages already in memory, timed in CPU seconds of the
  thread (the monitor's own cost, insensitive to other load on the machine).

The inference service is not part of this run (it may not be installed), so the comparison is
against the raw consume rate of its output topics; the monitor keeps up with inference as long as
its rate exceeds the rate inference can write predictions. Times run from the first batch to the
last message; group joins are excluded.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
from confluent_kafka import Message
from prometheus_client import CollectorRegistry

from loopline import avro
from loopline.apply import apply_spec
from loopline.broker import EmbeddedBroker
from loopline.kafka import AckedProducer, KafkaConfig
from loopline.profile import build_profile
from loopline.registry import RegistryReader, RegistryState, model_version_key, now_ms, publish
from loopline.services.monitor.metrics import MonitorMetrics
from loopline.services.monitor.service import MonitorService
from loopline.services.monitor.settings import MonitorSettings
from loopline.services.monitor.state import Checkpoint
from loopline.spec import PipelineSpec, load_spec

REPO = Path(__file__).resolve().parent.parent


def features_of(rng: np.random.Generator, n: int, shift: float = 0.0) -> dict[str, list]:  # type: ignore[type-arg]
    """Columns of n fraud-like events."""
    return {"customer_id": [f"c{i}" for i in rng.integers(0, 1000, n)],
            "amount": np.abs(rng.normal(100 + shift, 50, n)).tolist(),
            "merchant_risk": rng.random(n).tolist(), "hour": rng.integers(0, 24, n).tolist(),
            "country": rng.choice(["DE", "FR", "GB", "NL", "US"], n).tolist(),
            "card_present": (rng.random(n) < 0.7).tolist(),
            "device_age_days": [None if r < 0.1 else int(d) for r, d in zip(rng.random(n), rng.integers(0, 900, n))]}


def load(kafka: KafkaConfig, spec: PipelineSpec, n: int) -> int:
    """Register versions and write the messages; return how many messages the monitor will read."""
    rng = np.random.default_rng(0)
    producer = AckedProducer(kafka.producer("bench-load"))
    ref = features_of(rng, 5000)
    types = {f.name: f.type for f in spec.features}
    profile = build_profile(ref, types, {"value": rng.random(5000), "label": rng.choice(["0", "1"], 5000)})
    for version, stage in ((1, "champion"), (2, "challenger")):
        publish(producer, model_version_key(spec.name, "lr", version), {
            "kind": "model_version", "pipeline": spec.name, "at": now_ms(), "spec": None, "stage_change": None,
            "model": {"name": "lr", "version": version, "sha256": "0" * 64, "uri": "file:///x", "stage": stage,
                      "traffic": 0.5, "created_at": now_ms(),
                      "reference_profile_json": orjson.dumps(profile).decode()}})
    fcodec, pcodec, bcodec = avro.Codec(spec.features_schema()), avro.codec("prediction"), avro.codec("feedback")
    cols = features_of(rng, n, shift=20.0)
    t = spec.topics
    scores = rng.random((n, 2))
    for i in range(n):
        key = cols["customer_id"][i].encode()
        producer.send(t.features, fcodec.encode({
            "event_id": f"e{i}", "key": None, "ts": i, "ingested_at": i,
            "source": {"topic": t.raw, "partition": 0, "offset": i},
            "features": {k: v[i] for k, v in cols.items()}}), key=key)
        for version, variant in ((1, "champion"), (2, "challenger")):
            s = float(scores[i, version - 1])
            producer.send(t.predictions, pcodec.encode({
                "prediction_id": f"p{i}-{version}", "event_id": f"e{i}", "key": None, "pipeline": spec.name,
                "model_name": "lr", "model_version": version, "model_sha256": "0" * 64, "variant": variant,
                "served": version == 1, "label": "1" if s > 0.5 else "0", "value": s, "scores": {},
                "source": {"topic": t.features, "partition": 0, "offset": i}, "event_ts": i,
                "scored_at": now_ms()}), key=key)
        if i % 2 == 0:
            producer.send(t.feedback, bcodec.encode({
                "feedback_id": f"f{i}", "prediction_id": None, "event_id": f"e{i}",
                "label": "1" if rng.random() < 0.5 else "0", "value": None, "verdict": None, "ts": now_ms()}),
                key=key)
        if i % 5000 == 0:
            producer.producer.poll(0)
    producer.confirm()
    return n + 2 * n + (n + 1) // 2


def consume_all(kafka: KafkaConfig, topics: list[str], group: str, target: int,
                handle=None) -> tuple[float, list[Message]]:  # type: ignore[no-untyped-def]
    """Consume ``target`` messages (handing each batch to ``handle``); messages/s from the first batch."""
    consumer = kafka.consumer("bench", group)
    consumer.subscribe(topics)
    got: list[Message] = []
    first = 0.0
    try:
        while len(got) < target:
            batch = [m for m in consumer.consume(1000, 0.05) if m.error() is None]
            if not batch:
                continue
            if not first:
                first = time.perf_counter()
            if handle is not None:
                handle(batch)
            got.extend(batch)
        return len(got) / (time.perf_counter() - first), got
    finally:
        consumer.close()


def service(settings: MonitorSettings, state: RegistryState, kafka: KafkaConfig, home: Path) -> MonitorService:
    """A fresh monitor that knows the registry (as after catch-up)."""
    svc = MonitorService(settings, MonitorMetrics(CollectorRegistry()), AckedProducer(kafka.producer("bench-mon")),
                         Checkpoint(home / f"bench-{time.monotonic_ns()}.ckpt"))
    svc.sync(state)
    return svc


def main() -> None:
    """Run the benchmark and print events/s and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000, help="feature events (messages: 3.5x this)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(home=Path(tmp)) as broker:
        home = Path(tmp)
        settings = MonitorSettings(bootstrap_servers=broker.bootstrap_servers, kafka_profile="embedded",
                                   session_timeout_ms=6000, home=home)
        kafka = KafkaConfig.from_settings(settings)
        spec = load_spec(REPO / "examples" / "fraud.yaml").model_copy(update={"name": "benchmon"})
        apply_spec(kafka, spec)
        print(f"writing {args.events} events, {2 * args.events} predictions, {args.events // 2} feedback...",
              flush=True)
        total = load(kafka, spec, args.events)
        reader = RegistryReader(kafka, "bench-registry")
        state = reader.catch_up()
        reader.close()
        topics = [spec.topics.features, spec.topics.predictions, spec.topics.feedback]
        raw, mon, mem = [], [], []
        for r in range(args.rounds):
            rate, messages = consume_all(kafka, topics, f"bench-raw-{r}", total)
            raw.append(rate)
            svc = service(settings, state, kafka, home)
            alerts: list[dict] = []  # type: ignore[type-arg]
            rate, _ = consume_all(kafka, topics, f"bench-mon-{r}", total, lambda b: alerts.extend(svc.handle(b)))
            mon.append(rate)
            svc = service(settings, state, kafka, home)
            t0 = time.thread_time()  # CPU of this thread only: robust to other load on the machine
            for i in range(0, len(messages), 1000):
                svc.handle(messages[i:i + 1000])
            mem.append(len(messages) / (time.thread_time() - t0))
            print(f"round {r + 1}: raw consume {raw[-1]:,.0f} msg/s, monitor {mon[-1]:,.0f} msg/s "
                  f"({mon[-1] / raw[-1]:.0%}), handle only {mem[-1]:,.0f} msg per CPU-second; "
                  f"{len(alerts)} alert events", flush=True)
        r_raw, r_mon, r_mem = statistics.median(raw), statistics.median(mon), statistics.median(mem)
        per_event = r_mon * args.events / total
        print(f"\nmonitor: {r_mon:,.0f} messages/s = {per_event:,.0f} scored events/s (each event = 1 feature "
              f"message + 2 predictions + 0.5 feedback); {r_mon / r_raw:.0%} of the raw consume loop "
              f"({r_raw:,.0f} msg/s); handle-only CPU limit {r_mem:,.0f} msg per CPU-second "
              f"= {1e6 / r_mem:.1f} us per message")


if __name__ == "__main__":
    main()
