"""Loading model versions off the scoring thread: read, verify, build and warm in the background.

The scoring thread asks :meth:`ModelLoader.get` for a version's scorer: it gets the warmed scorer
if the version is loaded, else None at once, and a load starts in a background thread (at most
``parallel`` at a time). The plan in force keeps serving meanwhile. :meth:`ModelLoader.settle`,
called by the scoring thread, collects finished loads: a loaded version joins the next plan; a
version that failed is refused once (``on_refused``: log, metric, alert) and never retried. A
load still running ``timeout_s`` after it started is refused too; its thread cannot be killed
(Python threads cannot), so it is abandoned and whatever it returns later is dropped.

Artifacts come only from the configured :class:`loopline.artifacts.ArtifactStore`, by sha256;
the record's ``uri`` is informational and never opened.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from loopline.artifacts import ArtifactStore
from loopline.errors import ArtifactError, LooplineError
from loopline.scoring import Scorer, synthetic_batch
from loopline.spec import PipelineSpec

log = logging.getLogger(__name__)

#: (pipeline, model name, version)
VersionKey = tuple[str, str, int]
Refused = Callable[[str, dict[str, Any], str], None]
LoadFn = Callable[[str, PipelineSpec, dict[str, Any]], Scorer]


@dataclass
class _Load:
    """One version's load, shared between the scoring thread and its loader thread."""

    key: VersionKey
    pipeline: str
    spec: PipelineSpec
    record: dict[str, Any]
    started: float | None = None  # clock() when its thread started; None while queued
    scorer: Scorer | None = None
    error: str | None = None
    done: bool = False
    abandoned: bool = False


def _label(pipeline: str, record: dict[str, Any]) -> str:
    return f"{pipeline}/{record['name']} v{record['version']}"


class ModelLoader:
    """Loads, verifies and warms versions in the background; remembers refusals, reported once."""

    def __init__(self, store: ArtifactStore, *, intra_op_threads: int = 1, warm_rows: int = 16,
                 timeout_s: float = 60.0, parallel: int = 2, on_refused: Refused | None = None,
                 load: LoadFn | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.intra_op_threads = intra_op_threads
        self.warm_rows = warm_rows
        self.timeout_s = timeout_s
        self.parallel = parallel
        self.on_refused = on_refused
        self._load_fn = load or self.load
        self._clock = clock
        self._lock = threading.Condition()
        self._loads: dict[VersionKey, _Load] = {}  # queued or running
        self._queue: deque[_Load] = deque()
        self._running = 0
        self._loaded: dict[VersionKey, Scorer] = {}
        self._asked: set[VersionKey] = set()  # asked for since the last keep_only
        self.refused: dict[VersionKey, str] = {}
        #: Loads refused for their timeout whose threads have not returned (cannot be killed).
        self.stuck = 0

    # ---- the scoring thread's side ------------------------------------------------------------
    def get(self, pipeline: str, spec: PipelineSpec, record: dict[str, Any]) -> Scorer | None:
        """The warmed scorer of a version; None while it loads (in the background) or if refused."""
        key = (pipeline, record["name"], record["version"])
        self._asked.add(key)
        scorer = self._loaded.get(key)
        if scorer is not None or key in self.refused:
            return scorer
        with self._lock:
            if key not in self._loads:
                load = _Load(key, pipeline, spec, record)
                self._loads[key] = load
                self._queue.append(load)
                self._start_queued()
        return None

    def pending(self) -> int:
        """Loads queued or running."""
        with self._lock:
            return len(self._loads)

    def has_news(self) -> bool:
        """Whether :meth:`settle` would change anything (a load finished or ran out of time)."""
        now = self._clock()
        with self._lock:
            return any(load.done or self._late(load, now) for load in self._loads.values())

    def settle(self) -> bool:
        """Take in finished loads, refuse failed and late ones; True if any version changed."""
        now = self._clock()
        with self._lock:
            finished = [load for load in self._loads.values() if load.done]
            late = [load for load in self._loads.values()
                    if not load.done and self._late(load, now)]
            for load in finished + late:
                del self._loads[load.key]
            for load in late:
                load.abandoned = True
                self._running -= 1
                self.stuck += 1
            self._start_queued()
        for load in finished:
            if load.scorer is not None:
                self._loaded[load.key] = load.scorer
                log.info("model_loaded", extra={
                    "pipeline": load.pipeline, "model_name": load.key[1],
                    "model_version": load.key[2], "sha256": load.record["sha256"]})
            else:
                self._refuse(load, load.error or "unknown error")
        for load in late:
            self._refuse(load, f"{_label(load.pipeline, load.record)}: loading did not finish "
                               f"within {self.timeout_s:g}s (rule: load_timeout)")
        return bool(finished or late)

    def wait_idle(self, timeout_s: float) -> None:
        """Block until no load is queued or running, or ``timeout_s`` passed; then settle."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._loads and time.monotonic() < deadline:
                now = self._clock()
                if all(load.done or self._late(load, now) for load in self._loads.values()):
                    break
                self._lock.wait(min(0.1, max(deadline - time.monotonic(), 0.0)))
        self.settle()

    def isolate(self, pipeline: str, record: dict[str, Any], reason: str) -> None:
        """A version failed at run time: never hand it out again (until this process restarts)."""
        key = (pipeline, record["name"], record["version"])
        self._loaded.pop(key, None)
        self.refused[key] = reason

    def keep_only(self, keys: set[VersionKey]) -> None:
        """Drop loaded sessions neither a plan nor the last rebuild asked for."""
        keep = keys | self._asked
        for key in [k for k in self._loaded if k not in keep]:
            del self._loaded[key]
        self._asked = set()

    def _refuse(self, load: _Load, reason: str) -> None:
        self.refused[load.key] = reason
        log.error("model_refused", extra={"pipeline": load.pipeline, "model_name": load.key[1],
                                          "model_version": load.key[2],
                                          "sha256": str(load.record["sha256"])[:64],
                                          "reason": reason[:500]})
        if self.on_refused is not None:
            self.on_refused(load.pipeline, load.record, reason)

    def _late(self, load: _Load, now: float) -> bool:
        return load.started is not None and now - load.started > self.timeout_s

    # ---- the loader threads' side -------------------------------------------------------------
    def _start_queued(self) -> None:
        """Start queued loads while fewer than ``parallel`` run (the lock is held)."""
        while self._queue and self._running < self.parallel:
            load = self._queue.popleft()
            load.started = self._clock()
            self._running += 1
            threading.Thread(target=self._run, args=(load,), daemon=True,
                             name=f"load-{load.key[1]}-v{load.key[2]}").start()

    def _run(self, load: _Load) -> None:
        scorer: Scorer | None = None
        error: str | None = None
        try:
            scorer = self._load_fn(load.pipeline, load.spec, load.record)
        except Exception as e:  # noqa: BLE001 - any failure refuses the version, never the service
            label = _label(load.pipeline, load.record)
            error = str(e) if isinstance(e, LooplineError) else f"{label}: {type(e).__name__}: {e}"
        with self._lock:
            if load.abandoned:
                self.stuck -= 1
                log.warning("model_load_finished_late", extra={
                    "pipeline": load.pipeline, "model_name": load.key[1],
                    "model_version": load.key[2], "loaded": scorer is not None})
                return
            load.scorer, load.error, load.done = scorer, error, True
            self._running -= 1
            self._start_queued()
            self._lock.notify_all()

    def load(self, pipeline: str, spec: PipelineSpec, record: dict[str, Any]) -> Scorer:
        """Read a version's artifact from the store by sha256, build and warm its scorer."""
        label = _label(pipeline, record)
        try:
            data = self.store.read(record["sha256"])
        except ArtifactError as e:
            uri = str(record.get("uri", ""))
            hint = (f"; the record's uri {uri[:120]!r} is informational and is not read"
                    if e.rule == "in_store" and uri else "")
            raise ArtifactError(f"{label}: {e}{hint}", e.rule) from e
        scorer = Scorer(data, spec, record.get("fill_values") or {}, self.intra_op_threads, label,
                        record.get("input_features") or None)
        warm = scorer.score(synthetic_batch(spec, self.warm_rows))
        if warm.raw_scores is not None and not np.isfinite(warm.raw_scores).all():
            raise LooplineError(f"{label}: the warm-up batch scored NaN or inf "
                                "(rule: finite_output)")
        return scorer
