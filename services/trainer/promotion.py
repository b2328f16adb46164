"""Promotion by live performance on feedback, and automatic rollback of a weak new champion.

Policy ``auto``: a validated candidate is deployed as a shadow (or a canary when the pipeline has
a canary fraction) and a :class:`Trial` compares it with the champion on the labeled predictions
made after it was deployed (on the same events for a shadow). The candidate is promoted if it
beats the champion by ``trainer.margin``, else rejected (rolled back): at the latest once both
have ``trainer.min_live_samples`` labels, earlier (after at least 30) once a one-sided test is
conclusive at ``trainer.live_p`` (a sign test on the events where the two disagree when paired,
a z-test on the two means otherwise), so a short stream still gets a decision. A winner whose
holdout evidence is already decisive (``trainer.direct_promotion_p``) skips the trial.
A promotion starts a probation: the predecessor keeps scoring as a shadow, and if the new
champion falls below it by the margin (at the cap, or significantly earlier) the registry is
rolled back; otherwise the predecessor is retired.
Policy ``manual``: the candidate waits as a shadow for ``loopline models promote``.

The early test is re-run as labels arrive, which makes it somewhat less strict than its nominal
level; the margin, the floor of 30 labels and the probation that follows every promotion are
what keep a lucky streak from sticking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from scipy import stats

from loopline.models import ModelRegistry
from loopline.registry import now_ms
from loopline.services.trainer.join import Example

Key = tuple[str, int]
_EPS = 1e-9  # scores are means of 0/1: compare margins without float noise
#: Fewest labels per version before an early (significance-based) decision.
EARLY_FLOOR = 30


def sign_test(wins: int, losses: int) -> float:
    """One-sided p-value that ``wins`` of the ``wins + losses`` disagreements are luck (p = 0.5)."""
    n = wins + losses
    if n == 0:
        return 1.0
    return float(stats.binom.sf(wins - 1, n, 0.5))


@dataclass
class Trial:
    """Live comparison of two versions on labeled predictions (pickled into the checkpoint)."""

    phase: str  # "trial": candidate vs champion; "probation": new champion vs predecessor (shadow)
    challenger: Key
    incumbent: Key
    started_ms: int
    paired: bool
    regression: bool
    stats: dict[Key, list[float]] = field(default_factory=dict)  # key -> [n, sum, sum of squares]
    pairs: list[int] | None = None  # same events: [n, challenger better, incumbent better]

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
            s = self.stats.setdefault(key, [0.0, 0.0, 0.0])
            if len(s) < 3:
                s.append(0.0)  # a trial checkpointed before squares were kept
            s[0] += 1
            s[1] += score
            s[2] += score * score
        if self.challenger in mine and self.incumbent in mine:
            c, i = mine[self.challenger], mine[self.incumbent]
            pairs = self.pairs if self.pairs is not None else [0, 0, 0]
            pairs[0] += 1
            pairs[1] += c > i
            pairs[2] += i > c
            self.pairs = pairs

    def summary(self) -> dict[str, Any]:
        """Sample count and mean score of both versions."""
        out: dict[str, Any] = {"phase": self.phase}
        for role, key in (("challenger", self.challenger), ("incumbent", self.incumbent)):
            n, total = self.stats.get(key, [0.0, 0.0])[:2]
            out[role] = {"version": f"{key[0]}:{key[1]}", "n": int(n),
                         "score": total / n if n else None}
        return out

    def decision(self, min_samples: int, margin: float, p_value: float = 0.0) -> str | None:
        """``"challenger"`` if it won by the margin, ``"incumbent"`` otherwise; None until decided.

        At ``min_samples`` labels each the means decide; before that (from ``EARLY_FLOOR``) only a
        one-sided test significant at ``p_value`` does (0 turns early decisions off).
        """
        c = self.stats.get(self.challenger, [0.0, 0.0])
        i = self.stats.get(self.incumbent, [0.0, 0.0])
        n = min(c[0], i[0])
        if n == 0:
            return None
        cs, is_ = c[1] / c[0], i[1] / i[0]
        if n >= min_samples:
            if self.phase == "trial":
                return "challenger" if cs >= is_ + margin - _EPS else "incumbent"
            # Probation: the new champion (challenger) stays unless it is worse by the margin.
            return "incumbent" if cs < is_ - margin - _EPS else "challenger"
        if p_value <= 0 or n < min(EARLY_FLOOR, min_samples):
            return None
        better, worse = self._p_values(c, i)
        if self.phase == "trial":
            if better < p_value and cs >= is_ + margin - _EPS:
                return "challenger"
            return "incumbent" if worse < p_value else None
        if worse < p_value and cs < is_ - margin - _EPS:
            return "incumbent"
        return "challenger" if better < p_value else None

    def _p_values(self, c: list[float], i: list[float]) -> tuple[float, float]:
        """One-sided p-values that the challenger is better / worse than the incumbent."""
        if self.paired and self.pairs is not None:
            _, wins, losses = self.pairs
            return sign_test(wins, losses), sign_test(losses, wins)
        var = 0.0
        for n, total, *sq in (c, i):
            mean = total / n
            s2 = (sq[0] / n - mean * mean) if sq else mean * (1 - mean)
            var += max(s2, 1e-12) / n
        z = (c[1] / c[0] - i[1] / i[0]) / math.sqrt(var)
        return float(stats.norm.sf(z)), float(stats.norm.cdf(z))


def promote_on_probation(models: ModelRegistry, pipeline: str, challenger: Key, incumbent: Key,
                         reason: str,
                         regression: bool) -> Trial:
    """Make ``challenger`` champion and its predecessor a shadow; return the probation."""
    (cname, cver), (iname, iver) = challenger, incumbent
    models.promote(pipeline, cver, name=cname, to_stage="champion", reason=f"promoted: {reason}")
    models.promote(pipeline, iver, name=iname, to_stage="shadow",
                   reason="probation: the predecessor keeps scoring beside the new champion")
    return Trial("probation", challenger, incumbent, now_ms(), paired=True, regression=regression)
