"""The state of stateful services, kept in Kafka: one compacted changelog topic per service.

Each unit of ownership (a pipeline) has one record, keyed by the unit, in the changelog partition
its name hashes to; it holds the unit's state and the input offsets that state covers (with the
ids of those topics), written at checkpoint time in the same commit as the outputs it caused. A
replica that is assigned a changelog partition restores the units of that partition by reading it
to the end (the last record per unit wins), so no local disk is needed.

The records are pickles of the services' own objects (river detectors and learners, windows,
joins). Any Kafka client can write to a topic, so they are read by a restricted unpickler that
builds only the classes of Loopline's stateful services, river, numpy arrays and plain containers:
nothing else can be constructed or called, so a forged record cannot run code.

One policy for a record that cannot be used (corrupt, another format or river version, a class
outside that list): it is logged with its unit, partition and offset and counted, and the unit
starts fresh, from the beginning of its input topics, as a new unit would; the record stays in
the changelog until the unit's next checkpoint replaces it.
"""

from __future__ import annotations

import io
import logging
import pickle
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import river
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from loopline import topics
from loopline.errors import LooplineError, StateError
from loopline.kafka import KafkaConfig, TopicSpec, ensure_topics, watermarks
from loopline.runtime.outputs import Out

log = logging.getLogger(__name__)

#: Bumped when the envelope changes shape; a record of another format starts its unit fresh.
FORMAT = 1
#: Largest state record (the changelog topic and its producers are configured for it).
MAX_RECORD_BYTES = 64 * 1024 * 1024

_SAFE_BUILTINS = {"float", "int", "list", "dict", "set", "frozenset", "tuple", "str", "bytes",
                  "bytearray", "bool", "complex", "slice", "range"}
_SAFE_PREFIXES = ("loopline.services.monitor.", "loopline.services.trainer.", "loopline.spec",
                  "river.", "collections")
_SAFE_FUNCTIONS = {
    ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
    ("copyreg", "_reconstructor"), ("_codecs", "encode"),
}


def _safe_getattr(obj: Any, name: str) -> Any:
    """``getattr`` as pickles of bound methods use it: data attributes of allowed objects only."""
    if name.startswith("__") or not _allowed_type(type(obj)):
        raise StateError(f"state record asks for attribute {name!r} of a {type(obj).__name__}: "
                         "refused")
    return getattr(obj, name)


def _allowed_type(cls: type) -> bool:
    module = getattr(cls, "__module__", "") or ""
    return module.startswith(_SAFE_PREFIXES) or module in ("builtins", "numpy")


class _Unpickler(pickle.Unpickler):
    """Builds only allowed classes (see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        if "." in name:
            raise StateError(f"state record names {module}.{name}: nested lookups are refused")
        if module == "builtins":
            if name == "getattr":
                return _safe_getattr
            if name in _SAFE_BUILTINS:
                return super().find_class(module, name)
        elif (module, name) in _SAFE_FUNCTIONS:
            return super().find_class(module, name)
        elif module.startswith(_SAFE_PREFIXES):
            obj = super().find_class(module, name)
            if isinstance(obj, type):
                return obj
        raise StateError(f"state record names {module}.{name}, which is not a state class")


def encode_state(state: Any) -> bytes:
    """A state record: format, river version and the pickled state, compressed."""
    envelope = {"format": FORMAT, "river": river.__version__, "state": state}
    return zlib.compress(pickle.dumps(envelope, protocol=pickle.HIGHEST_PROTOCOL), 1)


def decode_state(data: bytes) -> Any:
    """The state of a record written by :func:`encode_state`;
    raise :class:`StateError` otherwise."""
    try:
        envelope = _Unpickler(io.BytesIO(zlib.decompress(data))).load()
    except StateError:
        raise
    except Exception as e:  # corrupt input raises many kinds
        raise StateError(f"unreadable state record: {type(e).__name__}: {e}") from e
    if not isinstance(envelope, dict) or envelope.get("format") != FORMAT:
        raise StateError("state record of another format "
                         f"({envelope.get('format') if isinstance(envelope, dict) else '?'})")
    if envelope.get("river") != river.__version__:
        # river's pickles are not promised to be stable across versions.
        raise StateError(f"state record written with river {envelope.get('river')}, this is "
                         f"{river.__version__}")
    return envelope["state"]


def partition_of(unit: str, partitions: int) -> int:
    """The changelog partition of a unit (stable: the same on every replica and restart)."""
    return zlib.crc32(unit.encode()) % partitions


@dataclass
class Restored:
    """What a changelog partition held: the state of
    each unit, and the units that could not be read."""

    states: dict[str, Any] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)  # unit -> why


class Changelog:
    """The compacted changelog topic of one service (``loopline.<service>.state``)."""

    def __init__(self, kafka: KafkaConfig, service: str, partitions: int) -> None:
        self.kafka = kafka
        self.service = service
        self.topic = topics.state_topic(service)
        self.partitions = partitions

    def ensure(self) -> None:
        """Create the topic (compacted, large records)
        if it does not exist; check its partitions."""
        spec = TopicSpec(self.topic, self.partitions, {"cleanup.policy": "compact",
                                                      "max.message.bytes": str(MAX_RECORD_BYTES)})
        ensure_topics(self.kafka.admin(f"loopline-{self.service}-state"), [spec],
                      self.kafka.settings.replication_factor)
        admin = self.kafka.admin(f"loopline-{self.service}-state")
        actual = len(admin.list_topics(self.topic, timeout=10).topics[self.topic].partitions)
        if actual != self.partitions:
            # Units hash to partitions: a changed count would move them without their state.
            raise LooplineError(f"{self.topic} has {actual} partitions, this {self.service} "
                                f"expects {self.partitions} (LOOPLINE_STATE_PARTITIONS); keep them "
                                "equal")

    def partition_of(self, unit: str) -> int:
        """The partition of a unit."""
        return partition_of(unit, self.partitions)

    def record(self, unit: str, state: Any) -> Out:
        """The changelog message that stores ``state`` for ``unit``."""
        data = encode_state(state)
        if len(data) > MAX_RECORD_BYTES:
            raise StateError(f"the state of {unit} is {len(data)} bytes, more than "
                             f"{MAX_RECORD_BYTES}")
        return Out(self.topic, data, unit.encode(), partition=self.partition_of(unit))

    def restore(self, partitions: Iterable[int], timeout_s: float = 60.0,
                progress: Callable[[int], None] | None = None) -> Restored:
        """The last state of every unit in ``partitions`` (read committed, to the end of each)."""
        wanted = sorted(set(partitions))
        out = Restored()
        if not wanted:
            return out
        reader = self.kafka.reader(f"loopline-{self.service}-restore",
                                   **{"enable.partition.eof": True,
                                      "fetch.message.max.bytes": MAX_RECORD_BYTES})
        raw: dict[str, tuple[bytes | None, int, int]] = {}
        try:
            reader.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in wanted])
            ends = {p: watermarks(reader, self.topic, p)[1] for p in wanted}
            done = {p for p, end in ends.items() if end == 0}
            deadline = time.monotonic() + timeout_s
            read = 0
            quiet = 0
            while len(done) < len(wanted) or quiet < 2:
                batch = reader.consume(1000, 0.2)
                if not batch:
                    quiet += 1
                    if len(done) == len(wanted):
                        continue
                    if time.monotonic() > deadline:
                        raise LooplineError(f"{self.topic}: could not read partitions "
                                            f"{sorted(set(wanted) - done)} "
                                            f"to their end within {timeout_s:.0f}s")
                    continue
                quiet = 0
                for m in batch:
                    err = m.error()
                    if err is not None:
                        done.add(m.partition())  # end of partition (eof), or an error for it
                        continue
                    key = (m.key() or b"").decode("utf-8", "replace")
                    raw[key] = (m.value(), m.partition(), m.offset())
                    read += 1
                if progress is not None:
                    progress(read)
        finally:
            reader.close()
        for unit, (value, partition, offset) in raw.items():
            if value is None:
                continue  # a tombstone: the unit was dropped
            try:
                out.states[unit] = decode_state(value)
            except StateError as e:
                out.unreadable[unit] = str(e)
                log.error("state_unreadable", extra={"topic": self.topic, "unit": unit,
                                                     "partition": partition,
                                                     "offset": offset, "error": str(e)[:300],
                                                     "policy": "the unit starts fresh from its "
                                                               "input topics"})
        return out
