"""Where the learner's examples came from: the holdout window and the exact offset ranges learned.

The newest ``trainer.holdout`` labeled examples are held back from the incremental learner, so a
candidate is always validated on recent data it never saw; an example is learned when it leaves
the holdout, and then kept (features and target only) in the labeled window that the batch
learners of the tournament train on (``trainer.window`` examples in all, holdout included).
:class:`Ranges` records, per features-topic partition, the first and last offset and the count of
the examples learned (an example is one labeled feature event), plus their event-time span.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from loopline.services.trainer.join import Example


@dataclass
class Ranges:
    """Per partition: [first offset, last offset, count]
    of learned examples, and the event-time span."""

    topic: str
    parts: dict[int, list[int]] = field(default_factory=dict)
    ts_min: int | None = None
    ts_max: int | None = None

    def add(self, partition: int, offset: int, ts: int) -> None:
        """Record one learned (or held out) example."""
        r = self.parts.get(partition)
        if r is None:
            self.parts[partition] = [offset, offset, 1]
        else:
            r[0], r[1], r[2] = min(r[0], offset), max(r[1], offset), r[2] + 1
        self.ts_min = ts if self.ts_min is None else min(self.ts_min, ts)
        self.ts_max = ts if self.ts_max is None else max(self.ts_max, ts)

    @property
    def count(self) -> int:
        """Examples recorded."""
        return sum(r[2] for r in self.parts.values())

    def records(self) -> list[dict[str, Any]]:
        """The ranges as registry ``OffsetRange`` records."""
        return [{"topic": self.topic, "partition": p, "first_offset": r[0], "last_offset": r[1],
                 "count": r[2]}
                for p, r in sorted(self.parts.items())]

    def summary(self) -> dict[str, Any]:
        """Ranges, count and time span, for a scorecard."""
        return {"count": self.count, "ranges": self.records(), "ts_min": self.ts_min,
                "ts_max": self.ts_max}

    def merged(self, other: Ranges) -> Ranges:
        """A copy covering both."""
        out = Ranges(self.topic, {p: list(r) for p, r in self.parts.items()}, self.ts_min,
                     self.ts_max)
        for p, r in other.parts.items():
            mine = out.parts.get(p)
            out.parts[p] = list(r) if mine is None else [min(mine[0], r[0]), max(mine[1], r[1]),
                                                         mine[2] + r[2]]
        for ts in (other.ts_min, other.ts_max):
            if ts is not None:
                out.ts_min = ts if out.ts_min is None else min(out.ts_min, ts)
                out.ts_max = ts if out.ts_max is None else max(out.ts_max, ts)
        return out


@dataclass
class Holdout:
    """The newest labeled examples, held back from the incremental learner, and the older window."""

    size: int
    items: deque[Example] = field(default_factory=deque)
    past: deque[Example] = field(default_factory=deque)  # left the holdout; oldest first

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Checkpoints written before the window existed have no ``past``: start it empty.
        state.setdefault("past", deque())
        self.__dict__.update(state)

    def push(self, example: Example, keep: int = 0) -> Example | None:
        """Add the newest example; return the one that leaves the holdout (to be learned), if any.

        The leaving example stays in the window while it is among the newest ``keep`` overall.
        """
        self.items.append(example)
        if len(self.items) <= self.size:
            return None
        out = self.items.popleft()
        room = keep - len(self.items)
        if room > 0:
            # The window only needs what a batch learner trains on: the predictions stay behind.
            self.past.append(replace(out, predictions=[]))
        while len(self.past) > max(room, 0):
            self.past.popleft()
        return out

    @property
    def full(self) -> bool:
        """Whether the holdout holds ``size`` examples."""
        return len(self.items) >= self.size

    @property
    def labeled(self) -> int:
        """Labeled examples in the window, holdout included."""
        return len(self.past) + len(self.items)

    def window(self, n: int | None = None) -> list[Example]:
        """The newest ``n`` labeled examples (all by default), oldest first."""
        out = [*self.past, *self.items]
        return out if n is None else out[-n:] if n > 0 else []

    def ranges(self, topic: str) -> Ranges:
        """The offset ranges of the held-out examples."""
        return ranges_of(topic, self.items)


def ranges_of(topic: str, examples: Iterable[Example]) -> Ranges:
    """The offset ranges of some examples."""
    r = Ranges(topic)
    for e in examples:
        r.add(e.partition, e.offset, e.ts)
    return r
