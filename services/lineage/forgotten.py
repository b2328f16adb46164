"""A pipeline's forgotten list: the data subjects the lineage store must never import again.

``<store>/<pipeline>/forgotten.json`` holds salted SHA-256 digests of forgotten keys, event ids
and prediction ids, never the values themselves::

    {"format": 1, "hash": "sha256(salt || value), hex", "salt": "<32 hex>",
     "keys": ["<digest>", ...], "events": [...], "predictions": [...],
     "log": [{"at": <epoch ms>, "keys": 1, "events": 6, "predictions": 12}, ...]}

``keys`` holds subjects' keys; a forgotten key stays blocked, so later events under it are not
stored either. The lineage service skips messages (by Kafka key) and rows (by key, event id,
prediction id) that match, reloading the file when it changes (:class:`ForgottenWatch`); the
query views hide them too. The salt is per store, so the digests
cannot be matched against another store's or a precomputed table; it sits next to them, so
anyone who can read the file and guesses a key can still test the guess: this is
pseudonymisation of the list, not anonymity.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from loopline.errors import LooplineError
from loopline.observability import bounded

log = logging.getLogger(__name__)

FILE_NAME = "forgotten.json"
FORMAT = 1
KINDS = ("keys", "events", "predictions")


def digest(salt: str, value: str) -> str:
    """Hex SHA-256 of ``salt + value`` (DuckDB's ``sha256(salt || value)`` is the same)."""
    return hashlib.sha256((salt + value).encode()).hexdigest()


@dataclass(frozen=True)
class Forgotten:
    """One version of a pipeline's forgotten list; false when nothing is forgotten."""

    salt: str = ""
    keys: frozenset[str] = frozenset()
    events: frozenset[str] = frozenset()
    predictions: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.keys or self.events or self.predictions)

    def _has(self, digests: frozenset[str], value: str | None) -> bool:
        return value is not None and bool(digests) and digest(self.salt, value) in digests

    def key(self, value: str | None) -> bool:
        """Whether ``value`` is a forgotten key."""
        return self._has(self.keys, value)

    def event(self, value: str | None) -> bool:
        """Whether ``value`` is a forgotten event id."""
        return self._has(self.events, value)

    def prediction(self, value: str | None) -> bool:
        """Whether ``value`` is a forgotten prediction id."""
        return self._has(self.predictions, value)

    def message_key(self, key: bytes | None) -> bool:
        """Whether a Kafka message key is a forgotten key, event id or prediction id.

        Features and predictions are keyed by the event key or event id, feedback by prediction or
        event id: a match means the message is a forgotten subject's (tombstones included).
        """
        if key is None or not self:
            return False
        d = digest(self.salt, key.decode("utf-8", "replace"))
        return d in self.keys or d in self.events or d in self.predictions

    def holds(self, table: str, row: Mapping[str, Any]) -> bool:
        """Whether a lineage row (features, predictions or feedback) is a forgotten subject's."""
        return (self.key(row.get("key")) or self.event(row.get("event_id"))
                or self.prediction(row.get("prediction_id")))

    def digests(self) -> list[tuple[str, str]]:
        """Every (kind, digest), for query views to filter on."""
        return [(kind, d) for kind in KINDS for d in sorted(getattr(self, kind))]


EMPTY = Forgotten()


def path_of(store_root: Path, pipeline: str) -> Path:
    """Where a pipeline's forgotten list lives."""
    return store_root / pipeline / FILE_NAME


def _parse(path: Path, data: bytes) -> tuple[Forgotten, dict[str, Any]]:
    try:
        doc = orjson.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"format must be {FORMAT}")
        salt = doc["salt"]
        if not isinstance(salt, str) or len(salt) < 16:
            raise ValueError("salt must be a string of at least 16 characters")
        sets = {}
        for kind in KINDS:
            values = doc.get(kind, [])
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise ValueError(f"{kind} must be a list of hex digests")
            sets[kind] = frozenset(values)
    except (orjson.JSONDecodeError, KeyError, ValueError) as e:
        raise LooplineError(f"the forgotten list {path} is unreadable ({bounded(str(e), 200)}); "
                            "restore it from a backup: without it, forgotten subjects would be "
                            "imported again") from e
    return Forgotten(salt, sets["keys"], sets["events"], sets["predictions"]), doc


def load(path: Path) -> Forgotten:
    """Read a forgotten list (a missing file is an empty list; an unreadable one raises)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return EMPTY
    return _parse(path, data)[0]


def add(path: Path, keys: Iterable[str], events: Iterable[str], predictions: Iterable[str],
        at_ms: int) -> tuple[Forgotten, dict[str, int]]:
    """Add one subject's keys and ids; return the new list and how many digests were new.

    The file is read and replaced under a lock (two forgets at once lose nothing) and written
    atomically (fsync, rename): a running lineage service sees the old list or the new one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{FILE_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            current, doc = _parse(path, path.read_bytes())
        except FileNotFoundError:
            current, doc = Forgotten(secrets.token_hex(16)), {"log": []}
        salt = current.salt
        added = {kind: {digest(salt, v) for v in values} - getattr(current, kind)
                 for kind, values in zip(KINDS, (keys, events, predictions), strict=True)}
        new = Forgotten(salt, *(getattr(current, kind) | added[kind] for kind in KINDS))
        counts = {kind: len(added[kind]) for kind in KINDS}
        out = {"format": FORMAT, "hash": "sha256(salt || value), hex", "salt": salt,
               **{kind: sorted(getattr(new, kind)) for kind in KINDS},
               "log": [*doc.get("log", []), {"at": at_ms, **counts}]}
        tmp = path.with_name(f".{FILE_NAME}.tmp")
        with open(tmp, "wb") as f:
            f.write(orjson.dumps(out, option=orjson.OPT_INDENT_2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    log.info("lineage_forgotten_added", extra={"file": str(path), **counts})
    return new, counts


@dataclass
class _Seen:
    signature: tuple[int, int, int] | None
    value: Forgotten
    next_check: float = 0.0


@dataclass
class ForgottenWatch:
    """The forgotten lists of a store, reloaded when a file changes (inode, mtime or size).

    ``get`` looks at the file at most every ``interval_s`` (``fresh=True``: now). An unreadable
    list raises the first time (the service must not import anything it cannot check); once a
    good version was read, a later unreadable one is logged and the good one kept.
    """

    root: Path
    interval_s: float = 0.5
    _seen: dict[str, _Seen] = field(default_factory=dict)

    def get(self, pipeline: str, fresh: bool = False) -> Forgotten:
        """The pipeline's current forgotten list."""
        seen = self._seen.get(pipeline)
        now = time.monotonic()
        if seen is not None and not fresh and now < seen.next_check:
            return seen.value
        path = path_of(self.root, pipeline)
        try:
            st = path.stat()
            signature: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            signature = None
        if seen is not None and signature == seen.signature:
            seen.next_check = now + self.interval_s
            return seen.value
        try:
            value = load(path) if signature is not None else EMPTY
        except LooplineError as e:
            if seen is None:
                raise
            log.error("lineage_forgotten_unreadable",
                      extra={"pipeline": pipeline, "error": bounded(str(e), 300),
                             "policy": "the last good list is kept"})
            value = seen.value
        else:
            log.info("lineage_forgotten_loaded", extra={
                "pipeline": pipeline, **{k: len(getattr(value, k)) for k in KINDS}})
        self._seen[pipeline] = _Seen(signature, value, now + self.interval_s)
        return value
