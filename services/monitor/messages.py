"""What an alert tells a person: what moved, how much, since when, how the model did, what to do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loopline.services.monitor.degradation import ErrorTest
from loopline.services.monitor.windowed import Comparison, Thresholds


def fmt(x: float | None) -> str:
    """A number for a message (4 significant digits), or n/a."""
    return "n/a" if x is None else f"{x:.4g}"


@dataclass(frozen=True)
class Performance:
    """Labeled-feedback performance of a model version while something else moved."""

    metric: str  # accuracy or mae
    baseline: float | None
    now: float
    labeled: int
    recent: int  # labels behind `now`

    def worse_by(self) -> float | None:
        """How much worse now is than the baseline (accuracy points, relative MAE)."""
        if self.baseline is None:
            return None
        if self.metric == "mae":
            return self.now / self.baseline - 1.0 if self.baseline > 0 else 0.0
        return self.baseline - self.now

    def text(self) -> str:
        """One sentence."""
        base = (
            f" vs {self.baseline:.3f} over its baseline labels"
            if self.baseline is not None
            else " (no baseline window yet)"
        )
        return (
            f"Labeled feedback meanwhile: {self.metric} {self.now:.3f} over the last {self.recent} "
            f"labels{base} ({self.labeled} labeled so far)."
        )

    def fields(self) -> dict[str, Any]:
        """Alert columns."""
        return {
            "performance_metric": self.metric,
            "performance_baseline": self.baseline,
            "performance_now": self.now,
            "labeled": self.labeled,
        }


def moved(c: Comparison) -> str:
    """What moved, reference vs now."""
    if c.moved is not None:
        return (
            f"the share of '{c.moved}' is {c.current_value:.1%} vs {c.reference_value:.1%} in the "
            "reference"
        )
    return (
        f"mean {fmt(c.current_value)} vs {fmt(c.reference_value)} in the reference, standard "
        f"deviation {fmt(c.current_sd)} vs {fmt(c.reference_sd)}"
    )


def drift_text(
    what: str, c: Comparison, t: Thresholds, reference: str, topic: str, how: str
) -> str:
    """A raised drift alert."""
    return (
        f"{what} drifted from {reference}: {moved(c)}, over the {c.n} events since {topic} "
        f"partition {c.first_partition} offset {c.first_offset}. Effect: PSI {c.effect:.3f} beyond "
        f"chance (observed {c.psi:.3f}; warning {t.psi_warning}, alert {t.psi_alert}); evidence: "
        f"p={c.p_value:.2g} ({c.evidence} test) counting {c.test.n_eff:.0f} effective events "
        f"(autocorrelation time {c.tau:.1f}); persistent: the latest {c.n - c.n // 2} events alone "
        f"show PSI {c.recent_effect:.3f}. Found by {how}."
    )


def drift_fields(c: Comparison, t: Thresholds, level: str) -> dict[str, Any]:
    """Alert columns of a drift comparison."""
    return {
        "statistic": c.effect,
        "threshold": t.psi_alert if level == "alert" else t.psi_warning,
        "window": c.n,
        "first_offset": c.first_offset,
        "first_partition": c.first_partition,
        "reference_value": c.reference_value,
        "current_value": c.current_value,
        "p_value": c.p_value,
        "effective_n": c.test.n_eff,
    }


def drift_action(
    pipeline: str, name: str, subject: str, perf: Performance | None, min_drop: float
) -> str:
    """What to do about a drift, given what labeled feedback says."""
    worse = perf.worse_by() if perf is not None else None
    if worse is not None and worse >= min_drop:
        return (
            "The model got worse meanwhile: retrain on recent data (the trainer arms a retrain on "
            "this alert when retrain.on_drift is set) or roll back with "
            f"`loopline models rollback {pipeline}`."
        )
    source = (
        f"check whatever produces '{name}' (a unit, a sensor, an upstream change)"
        if subject == "feature"
        else "look for drift alerts on the features that feed it"
    )
    known = (
        "Labeled feedback shows no drop so far"
        if worse is not None
        else "There is no labeled feedback to judge the model by yet"
    )
    return (
        f"{known}: if this is the new normal, accept it with "
        f"`loopline monitor rebaseline {pipeline}`; "
        f"otherwise {source}."
    )


def performance_text(
    model: str, variant: str, r: ErrorTest, regression: bool, how: str, min_drop: float
) -> str:
    """A raised performance alert."""
    if regression:
        change = (
            f"MAE {r.test.mean:.4g} vs {r.test.baseline:.4g} in its baseline window "
            f"(+{r.drop:.0%}; alert at +{min_drop:.0%})"
        )
    else:
        change = (
            f"accuracy {1 - r.test.mean:.3f} vs {1 - r.test.baseline:.3f} in its baseline window "
            f"({-r.drop:+.3f}; alert at -{min_drop})"
        )
    return (
        f"Performance of model {model} ({variant}) degraded: {change}, over the {r.n} labeled "
        f"predictions since feedback offset {r.first_offset}. Evidence: p={r.test.p_value:.2g} "
        f"counting {r.test.n_eff:.0f} effective labels (autocorrelation time {r.tau:.1f}); "
        f"persistent: the latest half alone is {r.recent_drop:+.3f} off. Found by {how}."
    )


def performance_fields(r: ErrorTest, min_drop: float) -> dict[str, Any]:
    """Alert columns of a performance test."""
    return {
        "statistic": r.drop,
        "threshold": min_drop,
        "window": r.n,
        "first_offset": r.first_offset,
        "reference_value": r.test.baseline,
        "current_value": r.test.mean,
        "p_value": r.test.p_value,
        "effective_n": r.test.n_eff,
    }


def performance_action(pipeline: str) -> str:
    """What to do about a performance drop."""
    return (
        "Retrain on recent labeled data (the trainer arms a retrain on this alert when "
        f"retrain.on_drift is set) or roll back with `loopline models rollback {pipeline}`; "
        "drift alerts on features "
        "around the same offsets point at the cause."
    )
