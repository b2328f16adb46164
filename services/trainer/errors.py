"""The trainer's errors: learners, transforms, exports and tournaments that cannot go on."""

from __future__ import annotations

from loopline.errors import LooplineError


class ExportError(LooplineError):
    """A learner cannot be exported to ONNX."""


class TransformError(LooplineError):
    """Transforms cannot be fitted or exported for a pipeline."""


class TreeExportError(LooplineError):
    """A tree has a node the exporter does not support."""


class BatchError(LooplineError):
    """A batch learner cannot be trained or exported."""


class TournamentError(LooplineError):
    """No contender could be trained and exported."""


class Deferred(LooplineError):
    """The champion's errors changed too recently for a tournament on the new concept: wait."""

    def __init__(self, pipeline: str, labels: int) -> None:
        super().__init__(
            f"pipeline {pipeline}: the concept changed {labels} label(s) short of a tournament"
        )
        self.labels = labels


class LearnerError(LooplineError):
    """A learner cannot be built for a pipeline or cannot learn an example."""
