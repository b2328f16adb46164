"""State records of stateful services: real states
round-trip; forged or foreign records are refused."""

from __future__ import annotations

import io
import os
import pickle
import zlib
from typing import Any

import numpy as np
import pytest
import river

from loopline.runtime.state import FORMAT, StateError, decode_state, encode_state, partition_of
from loopline.services.monitor.detectors import Detector
from loopline.services.monitor.pipeline import PipelineMonitor, Tuning
from loopline.services.trainer.service import new_state
from loopline.services.trainer.settings import TrainerSettings
from loopline.spec import load_spec

SPEC = load_spec(os.path.join(os.path.dirname(__file__), "..", "..", "examples", "fraud.yaml"))


def test_a_fed_detector_round_trips() -> None:
    det = Detector("adwin")
    det.update_many(np.random.default_rng(0).normal(0, 1, 1000))
    restored = decode_state(encode_state({"det": det, "offsets": {("t", 0): 41}}))
    assert restored["offsets"] == {("t", 0): 41} and restored["det"].seen == 1000


def test_real_monitor_and_trainer_states_round_trip() -> None:
    monitor = PipelineMonitor(SPEC, Tuning())
    trainer = new_state(SPEC, TrainerSettings())
    trainer.learner.learn({"amount": 1.0, "merchant_risk": 0.5, "hour": 3, "card_present": True,
                           "device_age_days": 12}, "1")
    state = decode_state(encode_state({"monitor": monitor, "trainer": trainer}))
    assert type(state["monitor"]) is PipelineMonitor and state["monitor"].spec == SPEC
    assert state["trainer"].learner.learned == trainer.learner.learned == 1


class Exploit:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned",))


class GetattrEscape:
    def __reduce__(self) -> tuple[Any, ...]:
        return (getattr, (Detector("adwin"), "__class__"))


@pytest.mark.parametrize("payload", [Exploit(), GetattrEscape(), {"f": eval}, io.StringIO("x")],
                         ids=["os.system", "getattr dunder", "eval", "other class"])
def test_a_forged_record_cannot_build_or_call_anything_else(payload: Any) -> None:
    envelope = {"format": FORMAT, "river": river.__version__, "state": payload}
    forged = zlib.compress(pickle.dumps(envelope, protocol=pickle.HIGHEST_PROTOCOL))
    with pytest.raises(StateError):
        decode_state(forged)


@pytest.mark.parametrize("data", [b"", b"not zlib", zlib.compress(b"not a pickle"),
                                  zlib.compress(pickle.dumps({"format": FORMAT - 1,
                                                              "river": river.__version__,
                                                              "state": 1})),
                                  zlib.compress(pickle.dumps({"format": FORMAT, "river": "0.0.1",
                                                              "state": 1}))],
                         ids=["empty", "not compressed", "not a pickle", "older format",
                              "other river"])
def test_an_unusable_record_raises_state_error(data: bytes) -> None:
    with pytest.raises(StateError):
        decode_state(data)


def test_units_hash_to_stable_partitions() -> None:
    assert [partition_of(f"p{i}", 12) for i in range(5)] == [partition_of(f"p{i}", 12)
                                                             for i in range(5)]
    assert len({partition_of(f"p{i}", 12) for i in range(200)}) == 12
