"""Checkpoints: atomic, restorable, and a broken file is set aside instead of crashing."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import river

from loopline.services.monitor.detectors import Detector
from loopline.services.monitor.state import FORMAT, Checkpoint


def test_round_trip_keeps_detector_state(tmp_path: Path) -> None:
    det = Detector("adwin")
    det.update_many(np.random.default_rng(0).normal(0, 1, 1000))
    ck = Checkpoint(tmp_path / "state" / "m.ckpt")
    assert ck.load() is None
    assert ck.save({"det": det, "offsets": {("t", 0): 41}}) > 0
    restored = ck.load()
    assert restored["offsets"] == {("t", 0): 41} and restored["det"].seen == 1000
    assert [p.name for p in ck.path.parent.iterdir()] == ["m.ckpt"]  # no temp files left


def test_unreadable_checkpoint_is_moved_aside(tmp_path: Path) -> None:
    ck = Checkpoint(tmp_path / "m.ckpt")
    ck.path.write_bytes(b"not a pickle")
    assert ck.load() is None
    assert not ck.path.exists() and (tmp_path / "m.bad").exists()


def test_checkpoint_of_another_river_version_is_ignored(tmp_path: Path) -> None:
    ck = Checkpoint(tmp_path / "m.ckpt")
    ck.path.write_bytes(pickle.dumps({"format": 1, "river": "0.0.1", "state": {"x": 1}}))
    assert ck.load() is None


def test_checkpoint_of_an_older_format_is_ignored(tmp_path: Path) -> None:
    ck = Checkpoint(tmp_path / "m.ckpt")
    envelope = {"format": FORMAT - 1, "river": river.__version__, "state": {"x": 1}}
    ck.path.write_bytes(pickle.dumps(envelope))
    assert ck.load() is None
