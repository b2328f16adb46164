"""Retrain triggers from ``spec.trainer.retrain``: drift alert, N new labels, verdict rules, schedule.

Counters run "since the last version" (accepted or rejected), so one trigger yields one
candidate. A drift alert arms a trigger that fires once ``drift_settle_labels`` labels arrived
after it, so the candidate has learned, and is validated on, data from after the drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loopline.spec import Trainer

DRIFT_SIGNALS = ("drift", "performance")


@dataclass
class RetrainPolicy:
    """Trigger state of one pipeline (pickled into the checkpoint)."""

    labels: int = 0
    accepts: int = 0
    rejects: int = 0
    last_version_ms: int = 0
    drift_alert: str | None = None
    labels_since_drift: int = 0

    def on_alert(self, alert: dict[str, Any]) -> bool:
        """Arm the drift trigger on a raised drift/performance alert; return whether it armed."""
        if alert["state"] != "raised" or alert["signal"] not in DRIFT_SIGNALS or alert["severity"] != "alert":
            return False
        if self.drift_alert is None:
            what = alert.get("feature") or alert.get("detector") or ""
            self.drift_alert = f"{alert['signal']}:{what}:{alert['alert_id'][:12]}"
            self.labels_since_drift = 0
            return True
        return False

    def on_example(self, verdict: str | None, labeled: bool) -> None:
        """Count one joined feedback."""
        if labeled:
            self.labels += 1
            if self.drift_alert is not None:
                self.labels_since_drift += 1
        if verdict == "accept":
            self.accepts += 1
        elif verdict == "reject":
            self.rejects += 1

    def due(self, cfg: Trainer, now_ms: int) -> str | None:
        """The trigger that fires now, or None."""
        r = cfg.retrain
        if r.on_drift and self.drift_alert is not None:
            settle = r.drift_settle_labels if r.drift_settle_labels is not None else 2 * cfg.holdout
            if self.labels_since_drift >= settle:
                return f"drift_alert({self.drift_alert})"
        if r.every_n_labels is not None and self.labels >= r.every_n_labels:
            return f"every_n_labels({r.every_n_labels})"
        if (r.min_accepts is not None or r.min_rejects is not None) and (
                self.accepts >= (r.min_accepts or 0) and self.rejects >= (r.min_rejects or 0)):
            return f"verdicts(accepts>={r.min_accepts or 0},rejects>={r.min_rejects or 0})"
        if r.schedule_s is not None and self.labels > 0 and self.last_version_ms and \
                now_ms - self.last_version_ms >= r.schedule_s * 1000:
            return f"schedule({r.schedule_s:g}s)"
        return None

    def reset(self, now_ms: int) -> None:
        """A version was recorded: start counting again."""
        self.labels = self.accepts = self.rejects = 0
        self.last_version_ms = now_ms
        self.drift_alert = None
        self.labels_since_drift = 0
