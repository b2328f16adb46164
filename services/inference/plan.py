"""Deployment plans: which loaded model versions serve which keys of a pipeline, from registry
state.

Routing: every event's key (its event_id when it has none) is hashed to a stable number in
[0, 1). Challengers and canaries each own a slice of that range, in (stage, name, version)
order from 0; the champion serves the rest. Shadows score every event and are never served.
A version takes traffic only once it is loaded and warmed (in the background, see
:mod:`loopline.services.inference.loader`): until then the plan in force keeps serving; a
version that cannot be loaded is refused (once) and the last good champion keeps serving.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loopline.models import champion, versions_of
from loopline.registry import RegistryState
from loopline.registry_rules import TRAFFIC_STAGES
from loopline.scoring import Scorer
from loopline.services.inference.loader import ModelLoader, Refused
from loopline.spec import PipelineSpec

__all__ = ["ModelLoader", "Plan", "Refused", "Variant", "build_plan", "key_bucket", "key_buckets"]

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
        """This plan with one version taken out (a champion
        replaced by the fallback); None if none is left."""
        if self.champion.ident == ident:
            if self.fallback is None or self.fallback.ident == ident:
                return None
            champion = Variant("champion", self.fallback.record, self.fallback.scorer, 1.0)
            return Plan(self.pipeline,
                        [*[v for v in self.served[:-1] if v.ident != ident], champion],
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

    def signature(self) -> tuple[tuple[str, str, int, str, float], ...]:
        """What changes when the plan changes (for logs and comparisons)."""
        return tuple((v.variant, *v.ident[:2], v.ident[2], v.traffic)
                     for v in [*self.served, *self.shadows])


def build_plan(pipeline: str, spec: PipelineSpec, state: RegistryState, loader: ModelLoader,
               previous: Plan | None) -> Plan | None:
    """The plan the registry asks for, using only versions already loaded; None if nothing serves.

    Versions not loaded yet are asked of ``loader`` (which loads them in the background) and left
    out until they are: the previous plan's champion serves meanwhile.
    """
    ordered = sorted(versions_of(state, pipeline),
                     key=lambda v: (TRAFFIC_STAGES.index(v["stage"]) if v["stage"] in TRAFFIC_STAGES
                                    else 9, v["name"], v["version"]))
    wanted = [v for v in ordered if v["stage"] == "shadow"
              # no traffic: not worth a load
              or (v["stage"] in TRAFFIC_STAGES and v["traffic"] > 0)]
    current = champion(state, pipeline)
    champ: Variant | None = None
    if current is not None:
        scorer = loader.get(pipeline, spec, current)  # asked first: it loads first
        if scorer is not None:
            champ = Variant("champion", current, scorer, 1.0)
    # Every other version is asked for now too, even before a champion serves, so they load
    # together and a start-up (which waits for the loads) serves its first batch with all of them.
    scorers = {(v["name"], v["version"]): loader.get(pipeline, spec, v) for v in wanted}
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
    for v in wanted:
        if (v["name"], v["version"]) == champ.ident[:2]:
            continue
        scorer = scorers[(v["name"], v["version"])]
        if scorer is None:
            continue
        if v["stage"] == "shadow":
            shadows.append(Variant("shadow", v, scorer, 0.0))
        else:
            slices.append(Variant(v["stage"], v, scorer, float(v["traffic"])))
    return Plan(pipeline, [*slices, champ], shadows, fallback)
