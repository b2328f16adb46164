"""Promotion by live performance on feedback, and automatic rollback of a weak new champion.

Policy ``auto``: a validated candidate is deployed as a shadow (or a canary when the pipeline has
a canary fraction) and a :class:`Trial` compares it with the champion on the labeled predictions
made after it was deployed (on the same events for a shadow). Once both have
``trainer.min_live_samples`` labels, the candidate is promoted if it beats the champion by
``trainer.margin``, else rejected (rolled back). A promotion starts a probation: the predecessor
keeps scoring as a shadow, and if the new champion falls below it by the margin over the same
sample size the registry is rolled back; otherwise the predecessor is retired.
Policy ``manual``: the candidate waits as a shadow for ``loopline models promote``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loopline.services.trainer.join import Example

Key = tuple[str, int]
_EPS = 1e-9  # scores are means of 0/1: compare margins without float noise


@dataclass
class Trial:
    """Live comparison of two versions on labeled predictions (pickled into the checkpoint)."""

    phase: str  # "trial": candidate vs champion; "probation": new champion vs predecessor (shadow)
    challenger: Key
    incumbent: Key
    started_ms: int
    paired: bool
    regression: bool
    stats: dict[Key, list[float]] = field(default_factory=dict)  # key -> [n, sum of scores]

    def observe(self, example: Example) -> None:
        """Count the predictions of both versions for one labeled event."""
        mine: dict[Key, float] = {}
        for p in example.predictions:
            key = (p.name, p.version)
            if key in (self.challenger, self.incumbent) and p.scored_at >= self.started_ms:
                if self.regression:
                    if p.value is not None:
                        mine[key] = -abs(float(p.value) - float(example.target))
                else:
                    mine[key] = 1.0 if p.label == example.target else 0.0
        if self.paired and len(mine) < 2:
            return
        for key, score in mine.items():
            s = self.stats.setdefault(key, [0.0, 0.0])
            s[0] += 1
            s[1] += score

    def summary(self) -> dict[str, Any]:
        """Sample count and mean score of both versions."""
        out: dict[str, Any] = {"phase": self.phase}
        for role, key in (("challenger", self.challenger), ("incumbent", self.incumbent)):
            n, total = self.stats.get(key, [0.0, 0.0])
            out[role] = {"version": f"{key[0]}:{key[1]}", "n": int(n), "score": total / n if n else None}
        return out

    def decision(self, min_samples: int, margin: float) -> str | None:
        """``"challenger"`` if it won by the margin, ``"incumbent"`` otherwise; None until enough samples."""
        c = self.stats.get(self.challenger, [0.0, 0.0])
        i = self.stats.get(self.incumbent, [0.0, 0.0])
        if min(c[0], i[0]) < min_samples:
            return None
        cs, is_ = c[1] / c[0], i[1] / i[0]
        if self.phase == "trial":
            return "challenger" if cs >= is_ + margin - _EPS else "incumbent"
        # Probation: the new champion (challenger) keeps its place unless it is worse by the margin.
        return "incumbent" if cs < is_ - margin - _EPS else "challenger"
