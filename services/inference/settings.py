"""Settings of the inference service (``LOOPLINE_*`` variables)."""

from __future__ import annotations

from pydantic import Field

from loopline.settings import ServiceSettings


class InferenceSettings(ServiceSettings):
    """How the inference service reads models and scores batches."""

    model_load_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="Longest a version may take to load and warm (in the "
        "background) before it is refused.")
    registry_poll_s: float = Field(
        0.2, gt=0, le=60, description="Longest time between two reads of new registry events.")
    intra_op_threads: int = Field(
        1, ge=0, le=64,
        description="ONNX Runtime intra-op threads per model (0: ORT default; 1 leaves "
        "the other core to the broker on a small machine).")
    warm_rows: int = Field(16, ge=1, le=10_000,
                           description="Rows of the warm-up batch a new version scores "
                           "before it takes traffic.")
    score_timeout_s: float = Field(
        10.0, gt=0, le=600,
        description="Longest one model may score one batch; a version that takes "
        "longer fails that batch (and is taken out of the plan if it fails every row).")
