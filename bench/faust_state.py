"""Service state in a Faust table vs a compacted changelog confluent-kafka writes at checkpoints.

Run: ``.venv/bin/python -m bench.faust_state [--engine tansu|kafka] [--updates N] [--keys K]
[--value-bytes S]`` (defaults N = 10000, K = 500, S = 256: about two minutes on 2 cores). Starts
its own broker of ``--engine`` unless LOOPLINE_BOOTSTRAP_SERVERS names a cluster (then
LOOPLINE_KAFKA_PROFILE says which tuning).

N state updates (key one of K, value S random bytes) arrive as events on a 3-partition topic.
Each way consumes them, keeps the last value per key and makes that state durable in Kafka:

- raw (the limit): consume every event in batches of 1000 with confluent-kafka, nothing else;
- checkpoint: the same loop keeps the state in a dict and, after every batch, writes the keys
  that batch changed to a compacted topic and waits for the acks (a pessimistic bound: the
  services checkpoint every few seconds, not every batch). Restore: read that topic to its end;
- faust table: a Faust worker (subprocess) whose agent sets ``table[key] = value``: one changelog
  record per update. Restore: a second worker of the same app recovers the table; the time is
  Faust's own, from the start to the end of reading the changelog. On the embedded broker it runs
  with ``loopline.faust.app_settings`` (one record per changelog batch, see that module), and once
  more with Faust's default batching, whose restore Tansu gets wrong (reported, not hidden).
  The same changelog is then read by confluent-kafka: the broker's share of the restore time.

Rates are updates/s from the first event handled to the last one durable; group joins and process
starts are excluded. Every restored state is compared with the expected last value per key.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faust
from confluent_kafka import KafkaError, TopicPartition

from bench.common import add_engine_argument, bench_broker
from loopline import faust as lf
from loopline.kafka import AckedProducer, KafkaConfig, TopicSpec, ensure_topics
from loopline.settings import LooplineSettings

PARTITIONS = 3
BATCH = 1000
_ROLE = "FAUST_STATE_ROLE"  # set in the worker subprocesses: which side of the bench they run


def say(msg: str) -> None:
    """Progress on stderr."""
    print(msg, file=sys.stderr, flush=True)


def digest(state: dict[str, bytes]) -> str:
    """One hash of a whole state, to compare restored states."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode() + b"\0" + state[key])
    return h.hexdigest()


def produce_events(kafka: KafkaConfig, topic: str, n: int, keys: int, size: int
                   ) -> dict[str, bytes]:
    """Write the N update events; return the state they add up to."""
    rng = random.Random(42)
    producer = AckedProducer(kafka.producer("bench-faust-state"))
    final: dict[str, bytes] = {}
    for _ in range(n):
        key, value = f"k{rng.randrange(keys)}", rng.randbytes(size)
        producer.send(topic, value, key=key)
        final[key] = value
    producer.confirm()
    return final


def consume_loop(kafka: KafkaConfig, topic: str, n: int, group: str,
                 checkpoint: str | None = None) -> float:
    """Consume N events in batches (checkpointing after each if asked); updates/s."""
    consumer = kafka.consumer("bench-faust-state", group)
    consumer.subscribe([topic])
    producer = AckedProducer(kafka.producer("bench-faust-state")) if checkpoint else None
    state: dict[str, bytes] = {}
    seen, start = 0, 0.0
    try:
        while seen < n:
            batch = [m for m in consumer.consume(BATCH, 0.05) if m.error() is None]
            if not batch:
                continue
            start = start or time.perf_counter()
            seen += len(batch)
            if producer is not None and checkpoint is not None:
                dirty: dict[str, bytes] = {}
                for m in batch:
                    dirty[m.key().decode()] = m.value()  # type: ignore[union-attr,assignment]  # not None here
                state.update(dirty)
                for key, value in dirty.items():
                    producer.send(checkpoint, value, key=key)
                producer.confirm()
        return n / (time.perf_counter() - start)
    finally:
        consumer.close()


def read_checkpoint(kafka: KafkaConfig, topic: str) -> tuple[dict[str, bytes], float, int]:
    """Restore a state from its changelog: the state, seconds, records read."""
    consumer = kafka.reader("bench-faust-state-restore", **{"enable.partition.eof": True})
    start = time.perf_counter()
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    state: dict[str, bytes] = {}
    ended, records = set[int | None](), 0
    try:
        while len(ended) < PARTITIONS:
            for m in consumer.consume(BATCH, 0.05):
                err = m.error()
                if err is None:
                    state[m.key().decode()] = m.value()  # type: ignore[union-attr,assignment]  # not None here
                    records += 1
                elif err.code() == KafkaError._PARTITION_EOF:
                    ended.add(m.partition())
        return state, time.perf_counter() - start, records
    finally:
        consumer.close()


# --- the Faust worker subprocesses -------------------------------------------------------------

def faust_worker(params: dict[str, Any]) -> None:
    """Run as a worker: ``write`` fills the table from the events, ``restore`` recovers it."""
    settings = LooplineSettings()
    conf = lf.app_settings(settings)
    if not params["one_record_batches"]:
        conf.pop("producer_max_batch_size", None)
    # value_serializer: the table's changelog values are the raw state bytes.
    app = faust.App(params["app_id"], **conf, web_enabled=False, store="memory://",
                    datadir=params["datadir"], value_serializer="raw")
    source = app.topic(params["topic"], key_type=str, value_type=bytes, key_serializer="raw",
                       value_serializer="raw")
    table = app.Table("state", key_type=str, value_type=bytes, partitions=PARTITIONS)
    result: dict[str, Any] = {}

    def finish() -> None:
        Path(params["result"]).write_text(json.dumps(result))
        os.kill(os.getpid(), signal.SIGTERM)  # Faust stops cleanly on it

    @app.agent(source)
    async def update(stream: faust.StreamT) -> None:
        async for key, value in stream.items():
            result.setdefault("start", time.perf_counter())
            table[key] = value
            result["seen"] = result.get("seen", 0) + 1
            if params["role"] == "write" and result["seen"] == params["updates"]:
                await app.producer.flush()
                result["end"] = time.perf_counter()
                finish()

    @app.task
    async def restored() -> None:
        if params["role"] != "restore":
            return
        recovery = app.tables.recovery  # type: ignore[attr-defined]  # TableManager has it
        while recovery._recovery_ended_at is None:
            await asyncio.sleep(0.05)
        result.update(seconds=recovery._recovery_ended_at - (recovery._recovery_started_at or 0),
                      digest=digest(dict(table.items())), keys=len(table))
        finish()

    sys.argv = [sys.argv[0], "worker", "-l", "warn"]
    app.main()


def run_faust(role: str, params: dict[str, Any], env: dict[str, str], timeout_s: float = 600
              ) -> dict[str, Any]:
    """One worker subprocess; its result."""
    result = Path(params["datadir"]) / f"{role}.json"
    params = {**params, "role": role, "result": str(result)}
    log = Path(params["datadir"]) / f"{role}.log"
    with log.open("wb") as out:
        proc = subprocess.run([sys.executable, "-m", "bench.faust_state"],
                              env={**env, _ROLE: json.dumps(params)}, stdout=out,
                              stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
    if not result.exists():
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"faust {role} worker failed (exit {proc.returncode}):\n{tail}")
    return json.loads(result.read_text())  # type: ignore[no-any-return]  # JSON is Any


def measure_faust(kafka: KafkaConfig, topic: str, n: int, expected: str, one_record_batches: bool,
                  home: Path) -> dict[str, Any]:
    """Write then restore the table with one app id; rates and restore time."""
    app_id = f"bench-faust-{'single' if one_record_batches else 'batched'}-{os.getpid()}"
    datadir = home / app_id
    datadir.mkdir(parents=True)
    s = kafka.settings
    env = {**os.environ, "LOOPLINE_BOOTSTRAP_SERVERS": kafka.broker.bootstrap_servers,
           "LOOPLINE_KAFKA_PROFILE": "embedded" if kafka.embedded else "kafka",
           "LOOPLINE_SESSION_TIMEOUT_MS": str(s.session_timeout_ms)}
    params = {"app_id": app_id, "topic": topic, "updates": n, "datadir": str(datadir),
              "one_record_batches": one_record_batches}
    written = run_faust("write", params, env)
    restored = run_faust("restore", params, env)
    # The same changelog read by confluent-kafka: what the broker allows, without Faust.
    _, read_s, records = read_checkpoint(kafka, f"{app_id}-state-changelog")
    return {"rate": n / (written["end"] - written["start"]), "restore_s": restored["seconds"],
            "restored_right": restored["digest"] == expected, "keys": restored["keys"],
            "read_s": read_s, "records": records}


def main() -> None:
    """Parse the arguments, run every way, print the table."""
    if _ROLE in os.environ:
        faust_worker(json.loads(os.environ[_ROLE]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--updates", type=int, default=10_000)
    parser.add_argument("--keys", type=int, default=500)
    parser.add_argument("--value-bytes", type=int, default=256)
    add_engine_argument(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-faust-state-") as tmp:
        home = Path(tmp)
        external = os.environ.get("LOOPLINE_BOOTSTRAP_SERVERS")
        if external:
            profile = os.environ.get("LOOPLINE_KAFKA_PROFILE", "kafka")
            settings = LooplineSettings(bootstrap_servers=external, kafka_profile=profile,
                                        session_timeout_ms=6000, home=home)
            report(KafkaConfig.from_settings(settings), args, home)
            return
        with bench_broker(args.engine, home) as broker:
            report(broker.kafka(), args, home)


def report(kafka: KafkaConfig, args: argparse.Namespace, home: Path) -> None:
    """Run every way on one broker and print the results."""
    run = f"{os.getpid()}-{int(time.time())}"
    topic, changelog = f"bench.faust-state.{run}.events", f"bench.faust-state.{run}.checkpoint"
    ensure_topics(kafka.admin(), [TopicSpec(topic, PARTITIONS),
                                  TopicSpec(changelog, PARTITIONS, {"cleanup.policy": "compact"})])
    say(f"producing {args.updates} updates over {args.keys} keys ({args.value_bytes} bytes each)")
    final = produce_events(kafka, topic, args.updates, args.keys, args.value_bytes)
    expected = digest(final)
    say("raw consume loop")
    raw = consume_loop(kafka, topic, args.updates, f"bench-raw-{run}")
    say("checkpoint loop")
    checkpoint = consume_loop(kafka, topic, args.updates, f"bench-ckpt-{run}", changelog)
    state, restore_s, records = read_checkpoint(kafka, changelog)
    rows: list[tuple[str, float | None, float, int, bool | None]] = [
        ("checkpoint (confluent-kafka, compacted topic)", checkpoint, restore_s, records,
         digest(state) == expected)]
    variants = [True, False] if kafka.embedded else [True]
    for single in variants:
        say(f"faust table ({'one record per batch' if single else 'batched changelog'})")
        f = measure_faust(kafka, topic, args.updates, expected, single, home)
        name = "faust table" + (" (one record per changelog batch)" if kafka.embedded and single
                                else " (batched changelog)" if kafka.embedded else "")
        rows.append((name, f["rate"], f["restore_s"], f["records"], f["restored_right"]))
        rows.append(("  its changelog read by confluent-kafka", None, f["read_s"], f["records"],
                     None))
    engine = "embedded (Tansu)" if kafka.embedded else "Apache Kafka profile"
    print(f"\n{args.updates} updates, {args.keys} keys, {args.value_bytes} B values; {engine}")
    print(f"raw consume loop (the limit): {raw:,.0f} updates/s")
    print(f"{'way':52} {'updates/s':>10} {'/raw':>6} {'restore s':>10} {'records':>8} {'right':>6}")
    for name, rate, seconds, count, right in rows:
        speed = f"{rate:10,.0f} {rate / raw:6.3f}" if rate is not None else " " * 17
        print(f"{name:52} {speed} {seconds:10.2f} {count:8} {'' if right is None else right!s:>6}")


if __name__ == "__main__":
    main()
