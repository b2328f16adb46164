"""Join feedback to the predictions and feature events it refers to: labeled examples.

State is bounded by ``trainer.label_ttl_s`` on the stream clock (the largest Kafka timestamp
seen, or the wall clock when idle, so a replayed backlog expires nothing early) and by a
maximum entry count. Feedback is deduplicated by ``feedback_id``; feedback whose prediction or
event is not known yet waits until the TTL and is then counted as an orphan. An event is
labeled at most once (a later label for the same event is counted, not learned twice).
Everything here is plain data, so the whole join pickles into the trainer's checkpoint.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any


@dataclass
class EventRow:
    """A feature event waiting for its label."""

    features: dict[str, Any]
    partition: int
    offset: int
    ts: int
    seen: int


@dataclass
class PredRow:
    """One variant's prediction of an event."""

    event_id: str
    name: str
    version: int
    variant: str
    served: bool
    label: str | None
    value: float | None
    scored_at: int
    seen: int


@dataclass
class Example:
    """A labeled example: the event's features, its true target, and every prediction of it."""

    event_id: str
    features: dict[str, Any]
    target: Any
    partition: int
    offset: int
    ts: int
    verdict: str | None
    predictions: list[PredRow]


@dataclass
class JoinCounts:
    """Counters of what the join did (exported as metrics, kept in the checkpoint)."""

    features: int = 0
    predictions: int = 0
    feedback: int = 0
    joined: int = 0
    duplicates: int = 0
    relabels: int = 0
    orphans: int = 0
    expired_events: int = 0
    unusable: int = 0
    waiting_now: int = 0


@dataclass
class FeedbackJoin:
    """The bounded join of one pipeline (see the module docstring)."""

    task: str
    classes: list[str]
    ttl_ms: int
    max_entries: int = 1_000_000
    clock: int = 0
    events: dict[str, EventRow] = field(default_factory=dict)
    preds: dict[str, PredRow] = field(default_factory=dict)
    event_preds: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    pending: dict[str, tuple[dict[str, Any], int]] = field(default_factory=dict)
    pending_by_ref: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    seen_feedback: dict[str, int] = field(default_factory=dict)
    labeled: dict[str, int] = field(default_factory=dict)
    counts: JoinCounts = field(default_factory=JoinCounts)

    # ---- inputs -------------------------------------------------------------------------------
    def advance(self, now_ms: int) -> None:
        """Move the stream clock forward (never back) and expire what outlived the TTL."""
        if now_ms > self.clock:
            self.clock = now_ms
        self._expire()

    def add_event(self, event: dict[str, Any], partition: int, offset: int,
                  seen: int) -> list[Example]:
        """Remember a feature event; return examples whose waiting feedback it completes."""
        self.counts.features += 1
        eid = event["event_id"]
        if eid in self.labeled or eid in self.events:
            return []  # a re-delivered event: already known or already learned
        self.events[eid] = EventRow(event["features"], partition, offset, event["ts"], seen)
        return self._retry(eid)

    def add_prediction(self, p: dict[str, Any], seen: int) -> list[Example]:
        """Remember a prediction; return examples whose waiting feedback it completes."""
        self.counts.predictions += 1
        pid = p["prediction_id"]
        if pid in self.preds:
            return []
        row = PredRow(p["event_id"], p["model_name"], p["model_version"], p["variant"], p["served"],
                      p.get("label"), p.get("value"), p["scored_at"], seen)
        self.preds[pid] = row
        self.event_preds[row.event_id].append(pid)
        return self._retry(pid) + self._retry(row.event_id)

    def predictions_of(self, event_id: str) -> list[PredRow]:
        """Every prediction of an event known now (a labeled event's keep arriving with a batch)."""
        return [self.preds[p] for p in self.event_preds.get(event_id, ()) if p in self.preds]

    def add_feedback(self, fb: dict[str, Any], seen: int) -> list[Example]:
        """Join one feedback; return the example it labels
        (or nothing: waiting, duplicate, unusable)."""
        self.counts.feedback += 1
        fid = fb["feedback_id"]
        if fid in self.seen_feedback:
            self.counts.duplicates += 1
            return []
        self.seen_feedback[fid] = seen
        example = self._resolve(fb)
        return [example] if example is not None else []

    # ---- join ---------------------------------------------------------------------------------
    def _wait(self, fb: dict[str, Any], ref: str) -> None:
        fid = fb["feedback_id"]
        if fid not in self.pending:
            self.pending[fid] = (fb, self.seen_feedback[fid])
            self.pending_by_ref[ref].append(fid)

    def _retry(self, ref: str) -> list[Example]:
        fids = self.pending_by_ref.pop(ref, None)
        if not fids:
            return []
        out = []
        for fid in fids:
            entry = self.pending.pop(fid, None)
            if entry is not None:
                example = self._resolve(entry[0])
                if example is not None:
                    out.append(example)
        return out

    def _served(self, event_id: str) -> PredRow | None:
        rows = [self.preds[pid] for pid in self.event_preds.get(event_id, ()) if pid in self.preds]
        served = [r for r in rows if r.served]
        return served[0] if served else None

    def _resolve(self, fb: dict[str, Any]) -> Example | None:
        pid, eid = fb.get("prediction_id"), fb.get("event_id")
        pred = self.preds.get(pid) if pid else None
        if pred is not None:
            eid = pred.event_id
        elif eid is None:
            self._wait(fb, pid)  # type: ignore[arg-type]  # only a prediction id: wait for it
            return None
        verdict = fb.get("verdict")
        if eid in self.labeled:
            self.counts.relabels += 1
            # Already learned; a verdict still reaches the business rules (the latest one counts).
            return Example(eid, {}, None, -1, -1, 0, verdict, []) if verdict else None
        row = self.events.get(eid)
        if row is None:
            self._wait(fb, eid)
            return None
        if pred is None and verdict in ("accept", "reject"):
            pred = self._served(eid)
            if pred is None:
                self._wait(fb, eid)  # the verdict is about a prediction not seen yet
                return None
        target = self._target(fb, pred)
        if target is None:
            self.counts.unusable += 1
            # A verdict without a learnable target still counts for business rules.
            return Example(eid, row.features, None, row.partition, row.offset, row.ts, verdict, [])
        self.labeled[eid] = self.clock
        del self.events[eid]
        preds = [self.preds[p] for p in self.event_preds.get(eid, ()) if p in self.preds]
        self.counts.joined += 1
        return Example(eid, row.features, target, row.partition, row.offset, row.ts, verdict, preds)

    def _target(self, fb: dict[str, Any], pred: PredRow | None) -> Any:
        verdict = fb.get("verdict")
        if self.task == "regression":
            if fb.get("value") is not None:
                return float(fb["value"])
            if verdict == "accept" and pred is not None and pred.value is not None:
                return float(pred.value)
            return None
        if fb.get("label") is not None:
            label = str(fb["label"])
            return label if not self.classes or label in self.classes else None
        if verdict == "accept" and pred is not None:
            return pred.label
        if verdict == "reject" and pred is not None and len(self.classes) == 2:
            others = [c for c in self.classes if c != pred.label]
            return others[0] if len(others) == 1 else None
        return None

    # ---- bounds -------------------------------------------------------------------------------
    def _expire(self) -> None:
        horizon = self.clock - self.ttl_ms
        for table, counter in ((self.events, "expired_events"), (self.preds, None)):
            while table:
                key = next(iter(table))
                row = table[key]
                if row.seen >= horizon and len(table) <= self.max_entries:
                    break
                del table[key]
                if counter:
                    setattr(self.counts, counter, getattr(self.counts, counter) + 1)
                else:
                    plist = self.event_preds.get(row.event_id)  # type: ignore[union-attr]  # a PredRow
                    if plist is not None:
                        if key in plist:
                            plist.remove(key)
                        if not plist:
                            del self.event_preds[row.event_id]  # type: ignore[union-attr]  # as above
        while self.pending:
            fid = next(iter(self.pending))
            _fb, seen = self.pending[fid]
            if seen >= horizon and len(self.pending) <= self.max_entries:
                break
            del self.pending[fid]
            self.counts.orphans += 1
        for ids in (self.seen_feedback, self.labeled):
            while ids:
                key = next(iter(ids))
                if ids[key] >= horizon and len(ids) <= self.max_entries:
                    break
                del ids[key]
        # pending_by_ref may keep ids of expired feedback; drop those lists lazily here.
        if len(self.pending_by_ref) > 2 * max(1, len(self.pending)):
            live = set(self.pending)
            self.pending_by_ref = defaultdict(list, {
                r: [f for f in fids if f in live] for r, fids in self.pending_by_ref.items()
                if any(f in live for f in fids)})
        self.counts.waiting_now = len(self.pending)
