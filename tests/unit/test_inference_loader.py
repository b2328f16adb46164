"""Background loading: scoring never waits for a model; failed and hung loads are refused once."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from loopline.artifacts import ArtifactStore
from loopline.registry import RegistryState, model_version_key, spec_event
from loopline.services.inference.loader import ModelLoader
from loopline.services.inference.plan import build_plan
from loopline.spec import parse_spec

SPEC = parse_spec({"name": "unit", "features": [{"name": "x", "type": "float"}]})


class Clock:
    """A clock the test moves, so timeouts need no waiting."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def record(version: int, stage: str = "champion", traffic: float = 1.0,
           sha: str | None = None) -> dict[str, Any]:
    return {"name": "unit", "version": version, "sha256": sha or f"{version:064x}",
            "uri": "file:///elsewhere/model.onnx", "stage": stage, "traffic": traffic,
            "created_at": version, "fill_values": {}, "input_features": []}


class Loads:
    """A load function whose loads the test finishes (or never does), one gate per version."""

    def __init__(self) -> None:
        self.gates: dict[int, threading.Event] = {}
        self.calls: list[int] = []
        self.fail: dict[int, Exception] = {}

    def gate(self, version: int) -> threading.Event:
        return self.gates.setdefault(version, threading.Event())

    def __call__(self, pipeline: str, spec: Any, rec: dict[str, Any]) -> Any:
        version = rec["version"]
        self.calls.append(version)
        self.gate(version).wait()
        if version in self.fail:
            raise self.fail[version]
        return f"scorer-v{version}"


@pytest.fixture
def loads() -> Iterator[Loads]:
    loads = Loads()
    yield loads
    for gate in loads.gates.values():  # let abandoned threads end
        gate.set()


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within 30s"
        time.sleep(0.01)


def make_loader(tmp_path: Path, loads: Loads, clock: Clock, refusals: list[tuple[int, str]],
                **kwargs: Any) -> ModelLoader:
    return ModelLoader(ArtifactStore(str(tmp_path)), timeout_s=5.0, load=loads, clock=clock,
                       on_refused=lambda p, r, reason: refusals.append((r["version"], reason)),
                       **kwargs)


def test_get_never_waits_and_a_finished_load_is_taken_in(tmp_path: Path, loads: Loads) -> None:
    refusals: list[tuple[int, str]] = []
    loader = make_loader(tmp_path, loads, Clock(), refusals)
    assert loader.get("unit", SPEC, record(1)) is None  # returns while the load is held
    assert loader.get("unit", SPEC, record(1)) is None and loader.pending() == 1
    until(lambda: loads.calls == [1], "load started")
    assert not loader.has_news() and not loader.settle()
    loads.gate(1).set()
    until(loader.has_news, "load finished")
    assert loader.settle()
    assert loader.get("unit", SPEC, record(1)) == "scorer-v1"
    assert loads.calls == [1] and not refusals


def test_a_failed_load_is_refused_once_and_never_retried(tmp_path: Path, loads: Loads) -> None:
    refusals: list[tuple[int, str]] = []
    loader = make_loader(tmp_path, loads, Clock(), refusals)
    loads.fail[2] = ValueError("broken graph")
    loads.gate(2).set()
    loader.get("unit", SPEC, record(2))
    until(loader.has_news, "load failed")
    loader.settle()
    for _ in range(3):
        assert loader.get("unit", SPEC, record(2)) is None
        loader.settle()
    assert [v for v, _ in refusals] == [2] and "broken graph" in refusals[0][1]
    assert loads.calls == [2]


def test_a_hung_load_is_refused_after_the_timeout_and_frees_its_slot(tmp_path: Path,
                                                                     loads: Loads) -> None:
    refusals: list[tuple[int, str]] = []
    clock = Clock()
    loader = make_loader(tmp_path, loads, clock, refusals, parallel=1)
    loader.get("unit", SPEC, record(1))  # hangs until the test ends
    loader.get("unit", SPEC, record(2, stage="shadow", traffic=0.0))  # queued behind it
    until(lambda: loads.calls == [1], "first load started")
    clock.now = 4.9
    assert not loader.has_news()
    clock.now = 5.1
    assert loader.has_news() and loader.settle()
    assert refusals == [(1, "unit/unit v1: loading did not finish within 5s (rule: load_timeout)")]
    assert loader.stuck == 1
    until(lambda: loads.calls == [1, 2], "the queued load started in the freed slot")
    loads.gate(2).set()
    until(loader.has_news, "second load finished")
    loader.settle()
    assert loader.get("unit", SPEC, record(2)) == "scorer-v2"
    loads.gate(1).set()  # the hung load returns at last: dropped, still refused
    until(lambda: loader.stuck == 0, "abandoned thread returned")
    assert loader.get("unit", SPEC, record(1)) is None and len(refusals) == 1


def state_with(*records: dict[str, Any]) -> RegistryState:
    state = RegistryState()
    key, event = spec_event(SPEC)
    state.apply(event, 0, key)
    for i, r in enumerate(records, 1):
        state.apply({"kind": "model_version", "pipeline": "unit", "at": r["created_at"],
                     "spec": None, "model": r, "stage_change": None}, i,
                    model_version_key("unit", "unit", r["version"]))
    return state


def test_the_plan_in_force_serves_until_the_new_champion_is_warm(tmp_path: Path,
                                                                 loads: Loads) -> None:
    refusals: list[tuple[int, str]] = []
    loader = make_loader(tmp_path, loads, Clock(), refusals)
    loads.gate(1).set()
    state = state_with(record(1))
    assert build_plan("unit", SPEC, state, loader, None) is None  # v1 loading: nothing yet
    loader.wait_idle(30)
    plan = build_plan("unit", SPEC, state, loader, None)
    assert plan is not None and plan.served[-1].record["version"] == 1
    state = state_with(record(1), record(2), record(3, stage="challenger", traffic=0.0))
    during = build_plan("unit", SPEC, state, loader, plan)
    assert during is not None and during.signature() == plan.signature()  # v1 keeps serving
    assert loads.calls == [1, 2], "a challenger without traffic was loaded"
    loads.gate(2).set()
    until(loader.has_news, "v2 loaded")
    loader.settle()
    after = build_plan("unit", SPEC, state, loader, during)
    assert after is not None and [v.record["version"] for v in after.served] == [2]


def test_the_real_load_reads_the_store_never_the_uri(tmp_path: Path) -> None:
    loader = ModelLoader(ArtifactStore(str(tmp_path / "store")))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    rec = record(1, sha="ab" * 32)
    rec["uri"] = fifo.as_uri()
    with pytest.raises(Exception, match="rule: in_store") as info:
        loader.load("unit", SPEC, rec)
    assert "is informational and is not read" in str(info.value)
    (tmp_path / "store").mkdir()
    os.mkfifo(tmp_path / "store" / f"{'ab' * 32}.onnx")
    with pytest.raises(Exception, match="rule: regular_file"):
        loader.load("unit", SPEC, rec)
