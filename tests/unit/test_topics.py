"""Topic names come from one place."""

from __future__ import annotations

import pytest

from loopline import topics
from loopline.errors import SpecError


def test_pipeline_topics() -> None:
    t = topics.PipelineTopics("fraud")
    assert t.all() == [f"loopline.fraud.{k}"
                       for k in ("raw", "features", "predictions", "feedback", "deadletter")]
    assert topics.pipeline_of(t.predictions) == "fraud"
    assert topics.pipeline_of(topics.MODELS) is None
    assert topics.MODELS == "loopline.models" and topics.ALERTS == "loopline.alerts"


@pytest.mark.parametrize("name", ["", "Fraud", "a.b", "1abc", "x" * 65, "a b"])
def test_invalid_pipeline_names(name: str) -> None:
    with pytest.raises(SpecError, match="name"):
        topics.PipelineTopics(name)
