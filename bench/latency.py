"""End-to-end latency: raw event -> served prediction through the real ingest and inference.

Run: ``.venv/bin/python -m bench.latency --engine tansu|kafka [--rates 100,1000,10000]
[--seconds 5] [--repeats 3] [--delivery both]`` (about 3 minutes per delivery mode at the
defaults; Kafka runs at-least-once and exactly-once by default).

What it does, on a broker it starts itself (``--engine``):

1. applies examples/fraud.yaml (3 partitions) and registers a champion (an ONNX logistic
   regression) through the real model registry;
2. starts ``python -m loopline.app.cli run ingest`` and ``... run inference`` as subprocesses
   with their real settings (only the broker address, pipeline, delivery mode, log level and
   metrics port are set), waits until both say ready on ``/readyz`` and one warm-up wave of
   events came through;
3. per repeat and rate, back to back on the same broker:

   - **broker round trip**: a paced confluent-kafka producer writes the same raw events to a plain
     3-partition topic, a ``read_committed`` consumer in another process reads them back; both use
     the same client settings as Loopline's clients (the engine's profile in loopline/kafka.py);
   - **Loopline**: the same paced producer writes the raw events to the pipeline's raw topic; a
     ``read_committed`` consumer in another process reads the predictions topic. Two hops:
     raw -> ingest -> features -> inference -> predictions.

   Latency is from just before ``produce()`` of the raw event (the bench's monotonic clock, the
   event's ``event_id`` tells which) to the arrival of its prediction (or its copy) at the
   consumer; the first second of each measurement is a warm-up and not counted. The ratio per hop
   is Loopline's 2-hop latency / (2 x the broker's round trip) of the same repeat.

Also reported per measurement: the achieved produce and arrival rates, messages that never
arrived, each service's mean batch and commit time (from its /metrics), the CPU each process
used (the machine has 2 cores shared by the broker, both services, producer and consumer) and,
for Loopline, where the time went: raw ``ts`` -> the prediction's ``scored_at`` (hop 1 and
inference's fetch and work) and ``scored_at`` -> arrival (inference's commit and the last
fetch), in wall-clock milliseconds.
Goal (issue 17): p99 <= 20 ms at 1,000 ev/s and <= 3x the broker's p99 per hop.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from confluent_kafka import Producer, TopicPartition

from bench.common import BenchBroker, add_engine_argument, bench_broker, say
from bench.monitor_throughput import features_of, records_of, train, truth
from loopline import avro
from loopline.apply import apply_spec
from loopline.artifacts import ArtifactStore
from loopline.brokers import free_port
from loopline.kafka import KafkaConfig, TopicSpec, ensure_topics, release_producer
from loopline.models import ModelRegistry, NewVersion
from loopline.registry import now_ms
from loopline.runtime.loop import tune_gc
from loopline.scoring import tabular_features
from loopline.settings import LooplineSettings
from loopline.spec import PipelineSpec, load_spec

REPO = Path(__file__).resolve().parent.parent
PIPELINE = "latbench"
WARMUP_S = 1.0  # the start of each measurement (joins, connections, a rate change) is not counted
DRAIN_S = 30.0  # how long to wait for the last messages after the producer stopped
DISTINCT = 20_000  # distinct feature records, reused round-robin


# ---- the event source -----------------------------------------------------------------------
class Events:
    """Raw fraud events as JSON: pre-serialised features, an event id and ts spliced in at send."""

    def __init__(self, n: int = DISTINCT) -> None:
        cols = features_of(np.random.default_rng(3), n)
        records = records_of(cols)
        self.keys = [r["customer_id"].encode() for r in records]
        self.bodies = [orjson.dumps(r) for r in records]

    def value(self, tag: str, seq: int, ts_ms: int) -> tuple[bytes, bytes]:
        """(key, value) of event ``seq`` of measurement ``tag``, produced at ``ts_ms``."""
        i = seq % len(self.bodies)
        return self.keys[i], (b'{"event_id":"%s-%d","ts":%d,"features":%s}'
                              % (tag.encode(), seq, ts_ms, self.bodies[i]))


def send_paced(producer: Producer, topic: str, events: Events, tag: str, rate: int,
               seconds: float) -> np.ndarray:
    """Produce ``rate`` events/s for ``seconds``, evenly spaced; return each one's send time."""
    n = max(1, int(rate * seconds))
    sent = np.zeros(n)
    produce, clock = producer.produce, time.monotonic
    t0 = clock()
    i = 0
    while i < n:
        due = min(n, int((clock() - t0) * rate) + 1)
        while i < due:
            key, value = events.value(tag, i, now_ms())
            sent[i] = clock()
            while True:
                try:
                    produce(topic, value, key=key)
                    break
                except BufferError:
                    producer.poll(0.001)
            i += 1
        producer.poll(0)
        wait = t0 + i / rate - clock()
        if wait > 0:
            time.sleep(wait)
    producer.flush(DRAIN_S)
    return sent


# ---- the consumer at the end (its own process, so the producer's GIL never delays it) ---------
def collect(conn: Connection, where: tuple[str, str]) -> None:
    """Serve measurements until told to stop: for each, send back its tag's arrivals.

    A job is (topic, start offsets, kind, tag, expected); the answer is (seq, arrival) of this
    tag's messages and, for predictions, where their time went. One process for the whole run:
    spawning one per measurement took seconds of a loaded machine's CPU each time.
    """
    bootstrap, profile = where
    kafka = KafkaConfig.from_settings(LooplineSettings(bootstrap_servers=bootstrap,
                                                       kafka_profile=profile))
    # Loopline's reader (the engine's fetch settings), reading only committed transactions.
    consumer = kafka.reader("bench-latency-collect", **{"isolation.level": "read_committed"})
    codec = avro.codec("prediction").decode
    # As the services do: a full collection here (100+ ms on a busy machine) would be counted
    # as the latency of every message behind it, broker's and Loopline's alike.
    tune_gc()
    try:
        while (job := conn.recv()) is not None:
            topic, starts, kind, tag, expected = job
            consumer.assign([TopicPartition(topic, p, o) for p, o in enumerate(starts)])
            conn.send(_collect_one(conn, consumer, codec if kind == "predictions" else None,
                                   f"{tag}-", expected))
    finally:
        consumer.close()


def _collect_one(conn: Connection, consumer: Any, decode: Any, prefix: str,
                 expected: int) -> tuple[list[int], list[float], list[int], list[int]]:
    """One measurement's arrivals (see :func:`collect`)."""
    seqs: list[int] = []
    arrivals: list[float] = []
    # Predictions only, wall-clock ms: raw ts -> scored_at (hop 1 and inference's work) and
    # scored_at -> arrival (inference's commit and the last fetch): where the time goes.
    scored: list[int] = []
    after: list[int] = []
    consumer.consume(1, 0.05)  # connect and start fetching before the producer starts
    conn.send("ready")
    deadline = None
    while len(seqs) < expected:
        if deadline is None and conn.poll():
            conn.recv()  # the producer finished: from now on, wait at most DRAIN_S
            deadline = time.monotonic() + DRAIN_S
        if deadline is not None and time.monotonic() > deadline:
            break
        # consume(n, timeout) returns only once it has n messages or the timeout passed: wait for
        # one, then take what has arrived (as the services do), or the wait adds up to 20 ms here
        batch = consumer.consume(1, 0.02)
        if batch:
            batch += consumer.consume(999, 0)
        now, wall_ms = time.monotonic(), now_ms()
        for m in batch:
            if m.error() is not None:
                continue
            record = decode(m.value()) if decode is not None else orjson.loads(m.value())
            event_id = record["event_id"]
            if event_id.startswith(prefix):
                seqs.append(int(event_id[len(prefix):]))
                arrivals.append(now)
                if decode is not None:
                    scored.append(record["scored_at"] - record["event_ts"])
                    after.append(wall_ms - record["scored_at"])
    if deadline is None:
        conn.recv()  # everything arrived before the producer said it finished
    return seqs, arrivals, scored, after


class Collector:
    """The consumer at the end, in a process of its own (the producer's GIL never delays it)."""

    def __init__(self, kafka: KafkaConfig) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        where = (kafka.broker.bootstrap_servers, "embedded" if kafka.embedded else "kafka")
        self.proc = ctx.Process(target=collect, args=(child, where), daemon=True)
        self.proc.start()

    def start(self, topic: str, starts: list[int], kind: str, tag: str, expected: int) -> None:
        """Begin reading ``topic`` from ``starts``; return once the consumer is fetching."""
        self.conn.send((topic, starts, kind, tag, expected))
        if not self.conn.poll(120) or self.conn.recv() != "ready":
            raise RuntimeError("the collector did not start")

    def finish(self) -> tuple[list[int], list[float], list[int], list[int]]:
        """Tell it the producer is done; its arrivals once all came or DRAIN_S passed."""
        self.conn.send("done")
        if not self.conn.poll(DRAIN_S + 60):
            raise RuntimeError("the collector did not report")
        return self.conn.recv()  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop the process."""
        if self.proc.is_alive():
            self.conn.send(None)
        self.proc.join(10)


# ---- one measurement ----------------------------------------------------------------------------
@dataclass
class Result:
    """One measurement: what was sent and how long it took to arrive."""

    target: str  # "broker" or "loopline"
    delivery: str
    rate: int
    repeat: int
    sent: int = 0
    arrived: int = 0
    produce_rate: float = 0.0
    arrival_rate: float = 0.0
    p50: float = 0.0
    p99: float = 0.0
    max: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        """One progress line."""
        lost = f", {self.sent - self.arrived} never arrived" if self.arrived < self.sent else ""
        extra = "".join(f", {k} {v:.1f}" for k, v in self.extra.items())
        return (f"{self.target:<8} {self.delivery:<13} {self.rate:>6}/s #{self.repeat}: p50 "
                f"{self.p50:6.1f} ms  p99 {self.p99:6.1f} ms  max {self.max:6.1f} ms; produced "
                f"{self.produce_rate:,.0f}/s, arrived {self.arrival_rate:,.0f}/s{lost}{extra}")


def high_watermarks(kafka: KafkaConfig, topic: str, partitions: int) -> list[int]:
    """Where each partition ends now (the collector starts there)."""
    c = kafka.reader("bench-latency-offsets")
    try:
        return [c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in range(partitions)]
    finally:
        c.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(kafka: KafkaConfig, collector: Collector, producer: Producer, events: Events,
            source: str, sink: str, kind: str, partitions: int, result: Result, seconds: float,
            watch: dict[str, int]) -> Result:
    """Send at ``result.rate`` to ``source``, time arrivals on ``sink``; fill ``result``."""
    # Unique per measurement: a late copy from an earlier one is never counted in this one.
    tag = (f"{result.target[0]}{result.delivery[0]}{result.rate}x{result.repeat}"
           f"t{time.time_ns() % 10**9}")
    expected = max(1, int(result.rate * (seconds + WARMUP_S)))
    collector.start(sink, high_watermarks(kafka, sink, partitions), kind, tag, expected)
    cpu0 = {name: cpu_seconds(pid) for name, pid in watch.items()}
    wall0 = time.monotonic()
    sent = send_paced(producer, source, events, tag, result.rate, seconds + WARMUP_S)
    seqs, arrivals, scored, after = collector.finish()
    wall = time.monotonic() - wall0
    for name, pid in watch.items():
        result.extra[f"cpu% {name}"] = 100 * (cpu_seconds(pid) - cpu0[name]) / wall
    seq = np.asarray(seqs, dtype=int)
    arrived = np.asarray(arrivals)
    counted = sent >= sent[0] + WARMUP_S
    keep = counted[seq]
    lat_ms = (arrived[keep] - sent[seq[keep]]) * 1000
    result.sent = int(counted.sum())
    result.arrived = int(np.unique(seq[keep]).size)
    span = sent[counted][-1] - sent[counted][0] if result.sent > 1 else 0.0
    result.produce_rate = (result.sent - 1) / span if span else 0.0
    first, last = (arrived[keep].min(), arrived[keep].max()) if keep.any() else (0.0, 0.0)
    result.arrival_rate = (result.arrived - 1) / (last - first) if last > first else 0.0
    if lat_ms.size:
        result.p50, result.p99 = (float(np.percentile(lat_ms, q)) for q in (50, 99))
        result.max = float(lat_ms.max())
    for name, part in (("to scored", scored), ("scored to arrival", after)):
        if part:
            kept = np.asarray(part)[keep]
            if kept.size:
                result.extra[f"{name} p50"] = float(np.percentile(kept, 50))
                result.extra[f"{name} p99"] = float(np.percentile(kept, 99))
    return result


# ---- the services ------------------------------------------------------------------------
class Services:
    """`loopline run ingest` and `loopline run inference` as subprocesses, with their /metrics."""

    NAMES = ("ingest", "inference")

    def __init__(self, broker: BenchBroker, delivery: str) -> None:
        self.ports = {name: free_port() for name in self.NAMES}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        for name in self.NAMES:
            env = broker.env(LOOPLINE_DELIVERY=delivery, LOOPLINE_PIPELINES=PIPELINE,
                             LOOPLINE_METRICS_PORT=str(self.ports[name]))
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "loopline.app.cli", "run", name], env=env)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until both answer 200 on /readyz."""
        deadline = time.monotonic() + timeout_s
        for name in self.NAMES:
            while True:
                if self.procs[name].poll() is not None:
                    raise RuntimeError(f"{name} exited with {self.procs[name].returncode}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[name]}/readyz",
                                                timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} not ready after {timeout_s:.0f}s")
                time.sleep(0.2)

    def loop_metrics(self) -> dict[str, dict[str, float]]:
        """Per service: batches, messages, commit seconds (sum, count) so far."""
        out: dict[str, dict[str, float]] = {}
        for name in self.NAMES:
            values: dict[str, float] = {}
            url = f"http://127.0.0.1:{self.ports[name]}/metrics"
            with urllib.request.urlopen(url, timeout=5) as r:
                for line in r.read().decode().splitlines():
                    for metric in ("loopline_batches_total", "loopline_messages_total",
                                   "loopline_commit_seconds_sum", "loopline_commit_seconds_count"):
                        if line.startswith(metric + "{"):
                            values[metric] = float(line.rsplit(" ", 1)[1])
            out[name] = values
        return out

    @property
    def pids(self) -> dict[str, int]:
        """Process id per service."""
        return {name: p.pid for name, p in self.procs.items()}

    def stop(self) -> None:
        """SIGTERM both and wait."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def batch_stats(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
                ) -> dict[str, float]:
    """Mean batch size and commit time per service between two scrapes."""
    out: dict[str, float] = {}
    for name in after:
        d = {k: after[name].get(k, 0.0) - before[name].get(k, 0.0) for k in after[name]}
        batches = d.get("loopline_batches_total", 0.0)
        commits = d.get("loopline_commit_seconds_count", 0.0)
        if batches:
            out[f"{name} batch"] = d.get("loopline_messages_total", 0.0) / batches
        if commits:
            out[f"{name} commit ms"] = 1000 * d.get("loopline_commit_seconds_sum", 0.0) / commits
    return out


# ---- setup and the run ------------------------------------------------------------------------
def setup_pipeline(kafka: KafkaConfig, home: Path) -> PipelineSpec:
    """Apply the pipeline and register its champion through the model registry."""
    spec = load_spec(REPO / "examples" / "fraud.yaml").model_copy(update={"name": PIPELINE})
    apply_spec(kafka, spec)
    rng = np.random.default_rng(1)
    cols = features_of(rng, 2000)
    reference = records_of(cols)
    model = train(reference, truth(rng, cols), tabular_features(spec), 1.0)
    ModelRegistry(kafka, ArtifactStore(str(home / "artifacts")), actor="bench").register(
        spec.name, model, NewVersion(name="lr", stage="champion", reference=reference))
    return spec


def run_mode(broker: BenchBroker, kafka: KafkaConfig, spec: PipelineSpec, delivery: str,
             args: argparse.Namespace, events: Events) -> list[Result]:
    """All rates and repeats for one delivery mode (services started once)."""
    rtt_topic = f"bench.latency.rtt.{delivery}"
    ensure_topics(kafka.admin(), [TopicSpec(rtt_topic, spec.partitions)])
    say(f"{delivery}: starting ingest and inference (loopline run)")
    collector = Collector(kafka)  # starts while the services do
    services = Services(broker, delivery)
    producer = kafka.producer("bench-latency-source")
    results: list[Result] = []
    try:
        services.wait_ready()
        watch = {**services.pids, "broker": broker.pids[0]}
        warm = measure(kafka, collector, producer, events, spec.topics.raw,
                       spec.topics.predictions, "predictions", spec.partitions,
                       Result("loopline", delivery, 200, 0), 2.0, {})
        say(f"{delivery}: services ready, warm-up wave through ({warm.arrived}/{warm.sent} events)")
        for repeat in range(1, args.repeats + 1):
            for rate in args.rates:
                r = measure(kafka, collector, producer, events, rtt_topic, rtt_topic, "raw",
                            spec.partitions, Result("broker", delivery, rate, repeat),
                            args.seconds, watch)
                say(r.line())
                results.append(r)
                before = services.loop_metrics()
                r = measure(kafka, collector, producer, events, spec.topics.raw,
                            spec.topics.predictions, "predictions", spec.partitions,
                            Result("loopline", delivery, rate, repeat), args.seconds, watch)
                r.extra.update(batch_stats(before, services.loop_metrics()))
                say(r.line())
                results.append(r)
    finally:
        services.stop()
        collector.close()
        release_producer(producer)
    return results


def spread(values: list[float]) -> str:
    """Median and range of repeated measurements."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def report(engine: str, results: list[Result], args: argparse.Namespace) -> None:
    """The table: per delivery mode and rate, medians (and ranges) over the repeats."""
    print(f"\nlatency, {engine} engine, raw event -> prediction (2 hops) vs broker round trip; "
          f"medians of {args.repeats} repeats (range), {args.seconds:g} s per measurement")
    print("| delivery | rate ev/s | achieved ev/s | broker p50 / p99 / max ms | "
          "Loopline p50 / p99 / max ms | per hop p50 | per hop p99 | lost |")
    print("|---|---|---|---|---|---|---|---|")
    for delivery in dict.fromkeys(r.delivery for r in results):
        for rate in args.rates:
            b = [r for r in results if (r.delivery, r.rate, r.target) == (delivery, rate, "broker")]
            lp = [r for r in results
                  if (r.delivery, r.rate, r.target) == (delivery, rate, "loopline")]
            if not b or not lp:
                continue
            hop50 = [x.p50 / (2 * y.p50) for x, y in zip(lp, b) if y.p50]
            hop99 = [x.p99 / (2 * y.p99) for x, y in zip(lp, b) if y.p99]
            print(f"| {delivery} | {rate:,} | {spread([x.arrival_rate for x in lp])} | "
                  f"{spread([x.p50 for x in b])} / {spread([x.p99 for x in b])} / "
                  f"{spread([x.max for x in b])} | {spread([x.p50 for x in lp])} / "
                  f"{spread([x.p99 for x in lp])} / {spread([x.max for x in lp])} | "
                  f"{spread(hop50)} | {spread(hop99)} | {sum(x.sent - x.arrived for x in lp)} |")
    print("\nper measurement (CPU % of each process over its wall time; 200 % = both cores):")
    for r in results:
        print("  " + r.line())
    for delivery in dict.fromkeys(r.delivery for r in results):
        at = [r for r in results if (r.delivery, r.rate, r.target) == (delivery, 1000, "loopline")]
        bt = [r for r in results if (r.delivery, r.rate, r.target) == (delivery, 1000, "broker")]
        if at and bt:
            p99 = statistics.median(x.p99 for x in at)
            hop = statistics.median(x.p99 / (2 * y.p99) for x, y in zip(at, bt))
            print(f"goal at 1,000 ev/s ({delivery}): p99 {p99:.1f} ms (<= 20: "
                  f"{'met' if p99 <= 20 else 'NOT met'}), per hop {hop:.2f}x the broker's p99 "
                  f"(<= 3: {'met' if hop <= 3 else 'NOT met'})")


def main() -> None:
    """Start the broker, run every delivery mode, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_argument(parser)
    parser.add_argument("--rates", default="100,1000,10000",
                        help="offered loads in events/s, comma separated")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="counted seconds per measurement (plus 1 s not counted)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--delivery", choices=("auto", "at-least-once", "exactly-once", "both"),
                        default=None, help="default: both on kafka, at-least-once on tansu")
    parser.add_argument("--json", type=Path, help="also write every measurement to this file")
    args = parser.parse_args()
    args.rates = [int(r) for r in args.rates.split(",")]
    delivery = args.delivery or ("both" if args.engine == "kafka" else "at-least-once")
    if delivery == "both":
        modes = ["at-least-once", "exactly-once"]
    elif delivery == "auto":
        modes = ["exactly-once" if args.engine == "kafka" else "at-least-once"]
    else:
        modes = [delivery]
    if args.engine == "tansu" and "exactly-once" in modes:
        parser.error("tansu has no transactions: exactly-once needs --engine kafka")
    say(f"load average at start: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} "
        f"{os.getloadavg()[2]:.2f} ({os.cpu_count()} cores)")
    events = Events()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="loopline-latency-") as tmp, \
            bench_broker(args.engine, Path(tmp)) as broker:
        kafka = broker.kafka()
        say("applying the pipeline and registering its champion")
        spec = setup_pipeline(kafka, broker.home)
        for mode in modes:
            results += run_mode(broker, kafka, spec, mode, args, events)
    say(f"load average at end: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} "
        f"{os.getloadavg()[2]:.2f}")
    report(args.engine, results, args)
    if args.json:
        args.json.write_text(json.dumps({"engine": args.engine, "seconds": args.seconds,
                                         "results": [asdict(r) for r in results]}, indent=1))


if __name__ == "__main__":
    main()
