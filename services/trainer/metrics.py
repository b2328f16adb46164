"""Prometheus metrics of the trainer."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from loopline.services.trainer.join import JoinCounts


class TrainerMetrics:
    """Counters and gauges of the trainer, in the service's private registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.learned = Counter("loopline_trainer_examples_learned", "Labeled examples learned",
                               ["pipeline"], registry=registry)
        self.join = Gauge("loopline_trainer_join", "Join counters since the trainer's state began "
                          "(features, predictions, feedback, joined, duplicates, relabels, "
                          "orphans, expired_events, unusable, waiting_now)", ["pipeline", "what"],
                          registry=registry)
        self.versions = Counter("loopline_trainer_versions",
                                "Versions the trainer recorded, by outcome",
                                ["pipeline", "outcome"], registry=registry)
        self.stage_changes = Counter("loopline_trainer_stage_changes",
                                     "Promotions, rejections, rollbacks",
                                     ["pipeline", "action"], registry=registry)
        self.repeated_verdicts = Counter(
            "loopline_trainer_repeated_verdicts",
            "Verdicts on an event that already had one (counted once "
            "by the business rules: the latest wins); a flood from one client shows here",
            ["pipeline"], registry=registry)
        self.bad_messages = Counter("loopline_trainer_bad_messages",
                                    "Undecodable input messages skipped",
                                    ["topic"], registry=registry)

    def join_counts(self, pipeline: str, counts: JoinCounts) -> None:
        """Publish a pipeline's join counters."""
        for what, value in vars(counts).items():
            self.join.labels(pipeline, what).set(value)
