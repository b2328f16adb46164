"""Retrain triggers from ``spec.trainer.retrain``: drift alert, N new labels, verdict rules,
schedule.

Counters run "since the last version" (accepted or rejected), so one trigger yields one
candidate. A drift alert arms a trigger that fires once ``drift_settle_labels`` labels arrived
after it (default: three times ``trainer.min_holdout``), so the candidate has learned, and is
validated on, data from after the drift. A short stream cannot wait for thousands of labels, so
the first try comes early; if its candidate is rejected the episode stays armed and is tried
again with twice the labels since the alert (and at least the first try's count of new labels),
up to ``drift_retries`` times. An accepted candidate that then loses its live trial, or is rolled
back on probation, re-opens its episode the same way: an alert that came just before the drift
(or a false one) must not use up the episode on a candidate that learned the old concept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    retries: int = 0  # rejected candidates of the armed drift episode so far
    episode: tuple[str, int] | None = None  # (drift alert, retries) of a candidate on trial
    deferred: int = 0  # labels to wait for before any trigger fires (the concept is too young)
    #: The latest verdict per event since the last version: business rules count one per event.
    verdicts: dict[str, str] = field(default_factory=dict)

    def on_alert(self, alert: dict[str, Any]) -> bool:
        """Arm the drift trigger on a raised drift/performance alert; return whether it armed."""
        if (alert["state"] != "raised" or alert["signal"] not in DRIFT_SIGNALS
                or alert["severity"] != "alert"):
            return False
        if self.drift_alert is None:
            what = alert.get("feature") or alert.get("detector") or ""
            self.drift_alert = f"{alert['signal']}:{what}:{alert['alert_id'][:12]}"
            self.labels_since_drift = 0
            return True
        return False

    def on_example(self, verdict: str | None, labeled: bool, event_id: str | None = None) -> bool:
        """Count one joined feedback; return whether it repeated a verdict already counted.

        Business rules count at most one verdict per event, the latest: a client sending the same
        verdict 300 times counts once, and one changing its mind moves its count (the feedback
        history itself stays in the lineage store).
        """
        if labeled:
            self.labels += 1
            self.deferred = max(0, self.deferred - 1)
            if self.drift_alert is not None:
                self.labels_since_drift += 1
        if verdict not in ("accept", "reject"):
            return False
        previous = self.verdicts.get(event_id) if event_id is not None else None
        if previous == verdict:
            return True
        if previous is not None:
            if previous == "accept":
                self.accepts -= 1
            else:
                self.rejects -= 1
        if event_id is not None:
            self.verdicts[event_id] = verdict
        if verdict == "accept":
            self.accepts += 1
        else:
            self.rejects += 1
        return previous is not None

    def due(self, cfg: Trainer, now_ms: int) -> str | None:
        """The trigger that fires now, or None."""
        r = cfg.retrain
        if self.deferred > 0:
            return None
        settled = self.drift_alert is not None and self.labels_since_drift >= self.settle(cfg)
        if r.on_drift and settled and (
                self.retries == 0 or self.labels >= self.settle(cfg) // 2 ** self.retries):
            # A retry also needs fresh labels since the candidate it retries (a long live trial can
            # push the count since the alert past several thresholds at once).
            retry = f",retry{self.retries}" if self.retries else ""
            return f"drift_alert({self.drift_alert}{retry})"
        if r.every_n_labels is not None and self.labels >= r.every_n_labels:
            return f"every_n_labels({r.every_n_labels})"
        if (r.min_accepts is not None or r.min_rejects is not None) and (
                self.accepts >= (r.min_accepts or 0) and self.rejects >= (r.min_rejects or 0)):
            return f"verdicts(accepts>={r.min_accepts or 0},rejects>={r.min_rejects or 0})"
        if r.schedule_s is not None and self.labels > 0 and self.last_version_ms and \
                now_ms - self.last_version_ms >= r.schedule_s * 1000:
            return f"schedule({r.schedule_s:g}s)"
        return None

    def defer(self, labels: int) -> None:
        """Let no trigger fire before ``labels`` more labels (the trigger itself stays due)."""
        self.deferred = max(self.deferred, labels)

    def settle(self, cfg: Trainer) -> int:
        """Labels after the drift alert before the armed episode's next candidate."""
        r = cfg.retrain
        base = r.drift_settle_labels if r.drift_settle_labels is not None else \
            3 * min(cfg.min_holdout, cfg.holdout)
        return max(1, base) * 2 ** self.retries

    def reset(self, now_ms: int) -> None:
        """A version was recorded: start counting again."""
        self.labels = self.accepts = self.rejects = 0
        self.verdicts = {}
        self.last_version_ms = now_ms
        self.drift_alert = None
        self.labels_since_drift = 0
        self.retries = 0
        self.episode = None
        self.deferred = 0

    def after_version(self, cfg: Trainer, now_ms: int, trigger: str, accepted: bool) -> None:
        """A version was recorded: reset, but keep a rejected drift episode armed for a retry."""
        armed = (self.drift_alert, self.labels_since_drift, self.retries + 1)
        self.reset(now_ms)
        if not trigger.startswith("drift_alert(") or armed[0] is None:
            return
        if accepted:
            self.episode = (armed[0], armed[2] - 1)
        elif armed[2] <= cfg.retrain.drift_retries:
            self.drift_alert, self.labels_since_drift, self.retries = armed

    def after_trial(self, cfg: Trainer, won: bool) -> None:
        """A live trial or probation ended; a lost one re-opens its drift episode (see above)."""
        episode, self.episode = self.episode, None
        if won or episode is None or self.drift_alert is not None \
                or episode[1] + 1 > cfg.retrain.drift_retries:
            return
        # The trial's labels (all since the candidate) count as waited for: the retry may come
        # at once.
        self.drift_alert, self.retries = episode[0], episode[1] + 1
        self.labels_since_drift = self.labels
