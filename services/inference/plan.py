"""Deployment plans: which loaded model versions serve which keys of a pipeline, from registry state.

Routing: every event's key (its event_id when it has none) is hashed to a stable number in
[0, 1). Challengers and canaries each own a slice of that range, in (stage, name, version)
order from 0; the champion serves the rest. Shadows score every event and are never served.
A version takes traffic only once it is loaded and warmed; a version that cannot be loaded is
refused (once) and the last good champion keeps serving.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loopline.artifacts import read_artifact
from loopline.errors import LooplineError
from loopline.models import TRAFFIC_STAGES, champion, versions_of
from loopline.registry import RegistryState
from loopline.scoring import Scorer, synthetic_batch
from loopline.spec import PipelineSpec

log = logging.getLogger(__name__)

_SCALE = float(2**64)


def key_bucket(key: str) -> float:
    """A stable number in [0, 1) for a key: the same key always lands in the same slice."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") / _SCALE


def key_buckets(keys: Iterable[str], n: int) -> np.ndarray:
    """:func:`key_bucket` of every key, as an array."""
    return np.fromiter(map(key_bucket, keys), dtype=np.float64, count=n)


@dataclass(frozen=True)
class Variant:
    """One loaded model version in a role: champion, challenger, canary or shadow."""

    variant: str
    record: dict[str, Any]
    scorer: Scorer
    traffic: float

    @property
    def ident(self) -> tuple[str, int, str]:
        """(model name, version, sha256)."""
        return self.record["name"], self.record["version"], self.record["sha256"]


@dataclass(frozen=True)
class Plan:
    """A pipeline's served variants (slices of the key range, champion last) and shadows."""

    pipeline: str
    served: list[Variant]
    shadows: list[Variant] = field(default_factory=list)
    #: The previous champion, kept warm: it takes over at once if the champion fails at run time.
    fallback: Variant | None = None

    @property
    def champion(self) -> Variant:
        """The variant serving every key no challenger or canary owns."""
        return self.served[-1]

    def without(self, ident: tuple[str, int, str]) -> Plan | None:
        """This plan with one version taken out (a champion replaced by the fallback); None if none is left."""
        if self.champion.ident == ident:
            if self.fallback is None or self.fallback.ident == ident:
                return None
            champion = Variant("champion", self.fallback.record, self.fallback.scorer, 1.0)
            return Plan(self.pipeline, [*[v for v in self.served[:-1] if v.ident != ident], champion],
                        [v for v in self.shadows if v.ident != ident], None)
        return Plan(self.pipeline, [v for v in self.served if v.ident != ident],
                    [v for v in self.shadows if v.ident != ident], self.fallback)

    @property
    def edges(self) -> np.ndarray:
        """Upper bounds of every served slice but the champion's."""
        return np.cumsum([v.traffic for v in self.served[:-1]])

    def route(self, keys: list[str]) -> np.ndarray | None:
        """Index into ``served`` for every key; None when the champion serves everything."""
        if len(self.served) == 1:
            return None
        return np.searchsorted(self.edges, key_buckets(keys, len(keys)), side="right")

    def signature(self) -> tuple[tuple[str, int, str, str, float], ...]:
        """What changes when the plan changes (for logs and comparisons)."""
        return tuple((v.variant, *v.ident[:2], v.ident[2], v.traffic) for v in [*self.served, *self.shadows])


Refused = Callable[[str, dict[str, Any], str], None]


class ModelLoader:
    """Loads, verifies and warms versions once; remembers refusals so they are reported once."""

    def __init__(self, intra_op_threads: int = 1, warm_rows: int = 16, on_refused: Refused | None = None) -> None:
        self.intra_op_threads = intra_op_threads
        self.warm_rows = warm_rows
        self.on_refused = on_refused
        self._loaded: dict[tuple[str, str, int], Scorer] = {}
        self.refused: dict[tuple[str, str, int], str] = {}

    def get(self, pipeline: str, spec: PipelineSpec, record: dict[str, Any]) -> Scorer | None:
        """The warmed scorer of a version, loading it now if needed; None if it is refused."""
        key = (pipeline, record["name"], record["version"])
        if key in self._loaded:
            return self._loaded[key]
        if key in self.refused:
            return None
        label = f"{pipeline}/{record['name']} v{record['version']}"
        try:
            data = read_artifact(record["uri"], record["sha256"])
            scorer = Scorer(data, spec, record.get("fill_values") or {}, self.intra_op_threads, label,
                            record.get("input_features") or None)
            warm = scorer.score(synthetic_batch(spec, self.warm_rows))
            if warm.raw_scores is not None and not np.isfinite(warm.raw_scores).all():
                raise LooplineError(f"{label}: the warm-up batch scored NaN or inf (rule: finite_output)")
        except Exception as e:  # noqa: BLE001 - any failure refuses the version, never the service
            reason = str(e) if isinstance(e, LooplineError) else f"{label}: {type(e).__name__}: {e}"
            self.refused[key] = reason
            log.error("model_refused", extra={"pipeline": pipeline, "model_name": record["name"],
                                              "model_version": record["version"], "sha256": record["sha256"],
                                              "reason": reason})
            if self.on_refused is not None:
                self.on_refused(pipeline, record, reason)
            return None
        self._loaded[key] = scorer
        log.info("model_loaded", extra={"pipeline": pipeline, "model_name": record["name"],
                                        "model_version": record["version"], "sha256": record["sha256"]})
        return scorer

    def isolate(self, pipeline: str, record: dict[str, Any], reason: str) -> None:
        """A version failed at run time: never hand it out again (until this process restarts)."""
        key = (pipeline, record["name"], record["version"])
        self._loaded.pop(key, None)
        self.refused[key] = reason

    def keep_only(self, keys: set[tuple[str, str, int]]) -> None:
        """Drop loaded sessions no plan uses any more."""
        for key in [k for k in self._loaded if k not in keys]:
            del self._loaded[key]


def build_plan(pipeline: str, spec: PipelineSpec, state: RegistryState, loader: ModelLoader,
               previous: Plan | None) -> Plan | None:
    """The plan the registry asks for, using only versions that loaded; None if nothing can serve."""
    current = champion(state, pipeline)
    champ: Variant | None = None
    if current is not None:
        scorer = loader.get(pipeline, spec, current)
        if scorer is not None:
            champ = Variant("champion", current, scorer, 1.0)
    if champ is None and previous is not None:
        # The registry's champion cannot load (or none is left): the last good one keeps serving.
        champ = previous.served[-1]
    if champ is None:
        return None
    fallback = previous.fallback if previous is not None else None
    if previous is not None and previous.champion.ident != champ.ident:
        fallback = previous.champion  # the champion it replaces stays warm for a rollback
    if fallback is not None and fallback.ident == champ.ident:
        fallback = None
    slices: list[Variant] = []
    shadows: list[Variant] = []
    ordered = sorted(versions_of(state, pipeline),
                     key=lambda v: (TRAFFIC_STAGES.index(v["stage"]) if v["stage"] in TRAFFIC_STAGES else 9,
                                    v["name"], v["version"]))
    for v in ordered:
        if (v["name"], v["version"]) == champ.ident[:2] or v["stage"] not in (*TRAFFIC_STAGES, "shadow"):
            continue
        scorer = loader.get(pipeline, spec, v)
        if scorer is None:
            continue
        if v["stage"] == "shadow":
            shadows.append(Variant("shadow", v, scorer, 0.0))
        elif v["traffic"] > 0:
            slices.append(Variant(v["stage"], v, scorer, float(v["traffic"])))
    return Plan(pipeline, [*slices, champ], shadows, fallback)
