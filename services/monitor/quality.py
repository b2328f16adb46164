"""Data quality per feature: missing, type-error and out-of-range rates over tumbling windows.

Counts come from two places: the features topic (optional features that are null; values
outside the spec's min/max/values, in case a producer bypassed ingest) and the dead-letter topic
(ingest's rejections, classified by their ``rule``). The denominator is every event seen in the
window: good ones plus dead letters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import numpy as np

from loopline.spec import Feature, PipelineSpec

KINDS = ("missing", "type_error", "out_of_range", "other")
EVENT = "_event"  # dead letters that blame no single field (unparseable, too large, ...)
NUMERIC = ("float", "int")

_FEATURES = itemgetter("features")


def classify_rule(rule: str) -> str:
    """Map a dead-letter rule to a quality kind."""
    r = rule.lower()
    if "type" in r or "nan" in r or "inf" in r or "finite" in r or "schema" in r:
        return "type_error"
    if "range" in r or r in ("min", "max", "values", "enum", "value"):
        return "out_of_range"
    if "required" in r or "missing" in r or "null" in r:
        return "missing"
    return "other"


@dataclass(frozen=True)
class Columns:
    """One batch of feature events by feature, extracted once for quality and drift."""

    raw: dict[str, list[Any]]  # as decoded, None: missing
    values: dict[str, np.ndarray | list[Any]]  # numeric features (spec type) as floats, None: NaN
    missing: dict[str, int]  # None values per feature; a NaN that was sent is present, as ever

    @classmethod
    def of_events(cls, records: list[dict[str, Any]], features: Sequence[Feature]) -> Columns:
        """The columns of feature events (each with a ``features`` mapping)."""
        feats = list(map(_FEATURES, records))
        raw: dict[str, list[Any]] = {}
        values: dict[str, np.ndarray | list[Any]] = {}
        missing: dict[str, int] = {}
        for f in features:
            name = f.name
            try:
                col = list(map(itemgetter(name), feats))
            except KeyError:  # an event that does not carry the feature: missing, as with a null
                col = [x.get(name) for x in feats]
            raw[name] = col
            if f.type in NUMERIC:
                arr = values[name] = np.array(col, dtype=float)
                # None became NaN: count the None values only when there is a NaN at all.
                missing[name] = _nulls(col) if np.isnan(arr).any() else 0
            else:
                values[name] = col
                missing[name] = _nulls(col)
        return cls(raw, values, missing)

    @classmethod
    def of_lists(cls, columns: dict[str, list[Any]]) -> Columns:
        """Columns given as lists of values, kept as lists."""
        missing = {name: _nulls(col) for name, col in columns.items()}
        return cls(dict(columns), dict(columns), missing)


def _nulls(values: list[Any]) -> int:
    # Faster than list.count(None), which compares every value with None by ==.
    return sum(1 for v in values if v is None)


@dataclass(frozen=True)
class QualityReport:
    """Rates of one finished window: ``rates[(feature, kind)]`` and how many events it covered."""

    rates: dict[tuple[str, str], float]
    events: int
    first_offset: int | None
    last_offset: int | None


@dataclass
class QualityTracker:
    """Counts problems per feature and kind; closes a window every ``window`` events."""

    spec: PipelineSpec
    window: int
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    events: int = 0
    first_offset: int | None = None
    last_offset: int | None = None

    def add_features(self, columns: Columns | dict[str, list[Any]],
                     offsets: list[int]) -> list[QualityReport]:
        """Count one batch of good events (columns of feature values); return finished windows."""
        n = len(offsets)
        if n == 0:
            return []
        if not isinstance(columns, Columns):
            columns = Columns.of_lists(columns)
        for f in self.spec.features:
            values = columns.values.get(f.name, [])
            missing = columns.missing.get(f.name, 0)
            if missing:
                self._count((f.name, "missing"), missing)
            if f.type in NUMERIC and (f.min is not None or f.max is not None):
                if isinstance(values, np.ndarray):
                    arr = values
                else:
                    arr = np.asarray([np.nan if v is None else v for v in values], dtype=float)
                bad = np.zeros(arr.size, dtype=bool)
                if f.min is not None:
                    bad |= arr < f.min
                if f.max is not None:
                    bad |= arr > f.max
                out = int(np.count_nonzero(bad))
                if out:
                    self._count((f.name, "out_of_range"), out)
            elif f.values is not None:
                # None is missing, not out of range; allowing it lets one C-level pass count.
                allowed = {*f.values, None}
                out = len(values) - sum(map(allowed.__contains__, values))
                if out:
                    self._count((f.name, "out_of_range"), out)
        return self._advance(n, offsets[0], offsets[-1])

    def add_dead_letters(self, letters: list[dict[str, Any]],
                         offsets: list[int]) -> list[QualityReport]:
        """Count one batch of dead letters; return finished windows."""
        if not letters:
            return []
        for d in letters:
            self._count((d.get("field") or EVENT, classify_rule(d.get("rule") or "")), 1)
        return self._advance(len(letters), offsets[0], offsets[-1])

    def _count(self, key: tuple[str, str], n: int) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def _advance(self, n: int, first: int, last: int, force: bool = False) -> list[QualityReport]:
        if self.first_offset is None:
            self.first_offset = first
        self.last_offset = last
        self.events += n
        if self.events < self.window and not force:
            return []
        report = self.report()
        self.counts = {}
        self.events, self.first_offset, self.last_offset = 0, None, None
        return [report]

    def flush(self, min_events: int) -> list[QualityReport]:
        """Close the current window early if it holds
        at least ``min_events`` (the stream paused)."""
        if self.events < max(1, min_events):
            return []
        return self._advance(0, self.first_offset or 0, self.last_offset or 0, force=True)

    def report(self) -> QualityReport:
        """Rates of the window so far (every spec feature and kind, zeros included)."""
        total = max(1, self.events)
        names = [f.name for f in self.spec.features] + [EVENT]
        rates = {(name, kind): self.counts.get((name, kind), 0) / total for name in names
                 for kind in KINDS}
        for key, count in self.counts.items():  # fields the spec does not know (renamed, unknown)
            rates.setdefault(key, count / total)
        return QualityReport(rates, self.events, self.first_offset, self.last_offset)
