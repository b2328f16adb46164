"""Register a trainer version through the same registration and validation as a user's model.

:meth:`loopline.models.ModelRegistry.register` validates the exported model (ONNX Runtime load,
input/output contract, a test batch from the reference data, no NaN), stores the artifact and
publishes the version with the trainer's lineage: training ranges, scorecard, library versions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from loopline.models import Lineage, ModelRegistry, NewVersion


def register_version(registry: ModelRegistry, pipeline: str, model: bytes, *, stage: str,
                     reference: Sequence[Mapping[str, Any]], metrics: Mapping[str, float],
                     trigger: str, training_ranges: list[dict[str, Any]], scorecard: dict[str, Any],
                     library_versions: Mapping[str, str]) -> dict[str, Any]:
    """Validate, store and publish a version with its lineage; return the version record."""
    return registry.register(pipeline, model, NewVersion(
        stage=stage, reference=reference, metrics=metrics, library_versions=library_versions,
        lineage=Lineage(trigger=trigger, training_ranges=training_ranges, scorecard=scorecard)))
