"""The candidate tournament: at each trigger every learner competes on the same holdout.

Contenders: the incremental river learner (a copy of it also learns the held-back examples that
are not in this tournament's holdout), every batch learner of ``trainer.learners`` fitted on the
labeled window, and the champion's own family when the champion's graph tells it and it is not in
the list already (a trainer export records its learner; otherwise the operators do: tree ensembles,
linear heads, products of inputs). All are exported to ONNX with the champion's input float type,
scored through the Scorer on the same holdout, and the best one wins (ties: the simpler, earlier
contender). The winner is then refitted on its training labels plus the holdout, the newest and,
after a drift, the most telling labels there are; the live trial (or probation) judges the model
that is registered.

Which labels. When the champion's errors over the window change significantly (a one-change
likelihood-ratio scan, repeated on the newer side), the batch learners use only the labels after
the change: a drift alert comes hundreds of events after the drift, and the labels in between are
the most valuable ones a short stream has. If the change is so recent that fewer than
``2 * min_holdout`` labels follow it, the tournament is deferred until they have arrived. A
gradual drift hides in the noise or goes on after the change, so when there are enough labels
each batch learner also competes on the newest half of the training labels. The holdout is the
newest ``holdout_fraction`` of the usable labels, between ``min_holdout`` and
``holdout``; the rest is the training set.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from loopline.errors import LooplineError
from loopline.models import fill_values
from loopline.scoring import Scorer
from loopline.services.trainer.batch import BatchModel, model_inputs
from loopline.services.trainer.data import Holdout, Ranges, ranges_of
from loopline.services.trainer.errors import Deferred, TournamentError
from loopline.services.trainer.export import to_onnx
from loopline.services.trainer.join import Example
from loopline.services.trainer.learner import Learner
from loopline.services.trainer.validation import Evaluation, evaluate
from loopline.spec import BatchLearner, PipelineSpec, Transform

log = logging.getLogger(__name__)

#: Fewest labels on either side of a change in the champion's error rate.
MIN_SEGMENT = 30
_TREE_OPS = {"TreeEnsembleClassifier", "TreeEnsembleRegressor", "TreeEnsemble"}
_LINEAR_OPS = {"LinearClassifier", "LinearRegressor", "MatMul", "Gemm"}
_HIDDEN_OPS = {"Relu", "Tanh", "LeakyRelu", "Elu", "Selu", "SVMClassifier", "SVMRegressor"}
_RIVER_KINDS = ("logistic_regression", "linear_regression", "hoeffding_adaptive_tree")


@dataclass
class Contender:
    """One learner of a tournament: its exported model, what it learned, its holdout result."""

    name: str
    ranges: Ranges
    trained_on: int = 0
    model: bytes | None = None
    evaluation: Evaluation | None = None
    error: str | None = None
    refit: Callable[[], Contender] | None = None  # the same learner on its labels plus the holdout

    def row(self, winner: bool) -> dict[str, Any]:
        """The contender's line in the scorecard."""
        m = self.evaluation.metrics if self.evaluation is not None else None
        return {
            "learner": self.name,
            "score": m["score"] if m else None,
            "metrics": m,
            "trained_on": self.trained_on,
            "winner": winner,
            "error": self.error,
        }


@dataclass
class Tournament:
    """A finished tournament: contenders, winner, the champion on the same holdout."""

    contenders: list[Contender]
    winner: Contender
    registered: Contender  # the winner refitted with the holdout (or the winner, if that failed)
    champion: Evaluation | None
    holdout: list[Example]
    holdout_ranges: Ranges
    input_type: str
    window_info: dict[str, Any] = field(default_factory=dict)
    family: dict[str, Any] | None = None


# ---- sizes ---------------------------------------------------------------------------------------
def min_holdout(spec: PipelineSpec) -> int:
    """The smallest holdout of a tournament (``trainer.min_holdout``, at most ``holdout``)."""
    return min(spec.trainer.min_holdout, spec.trainer.holdout)


def ready(spec: PipelineSpec, holdout: Holdout) -> bool:
    """Whether the window holds enough labels for a tournament: a minimal holdout, twice."""
    return holdout.labeled >= 2 * min_holdout(spec)


def holdout_size(spec: PipelineSpec, usable: int) -> int:
    """The holdout of a tournament over ``usable`` labels (see the module docstring)."""
    low = min_holdout(spec)
    h = round(spec.trainer.holdout_fraction * usable)
    return max(low, min(h, spec.trainer.holdout, usable - low))


def input_dtype(champion: Scorer | None) -> np.dtype:
    """float32 when the champion takes float32 numbers (so shadows are fed alike), else float64."""
    if champion is not None and any(
        i.type == "tensor(float)" for i in champion.session.get_inputs()
    ):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


# ---- where the current concept starts -----------------------------------------------------------
def change_point(
    errors: np.ndarray, binary: bool, min_size: int = MIN_SEGMENT
) -> tuple[int, float] | None:
    """The most likely single change in the mean of ``errors`` and its statistic, if significant.

    Twice the log-likelihood ratio of "two segments" vs "one" (Bernoulli for 0/1 errors, Gaussian
    otherwise), maximised over the split; significant above ``2 ln n + 8``, a bound that keeps a
    stationary window of a few thousand labels from splitting (about p < 1e-4 per window).
    """
    n = int(errors.size)
    if n < 2 * min_size:
        return None
    cs = np.cumsum(errors, dtype=np.float64)
    t = np.arange(min_size, n - min_size + 1)
    s1, n1 = cs[t - 1], t.astype(np.float64)
    s2, n2 = cs[-1] - s1, n - n1
    if binary:

        def ll(s: np.ndarray, m: np.ndarray) -> np.ndarray:
            p = np.clip(s / m, 1e-12, 1 - 1e-12)
            return np.asarray(s * np.log(p) + (m - s) * np.log(1 - p))

        stat = 2 * (ll(s1, n1) + ll(s2, n2) - ll(np.array(cs[-1]), np.array(float(n))))
    else:
        var = float(errors.var())
        if var <= 0:
            return None
        stat = (s1 / n1 - s2 / n2) ** 2 / (var * (1 / n1 + 1 / n2))
    best = int(np.argmax(stat))
    if stat[best] > 2 * math.log(n) + 8:
        return int(t[best]), float(stat[best])
    return None


def current_concept(errors: np.ndarray, binary: bool) -> tuple[int, list[dict[str, Any]]]:
    """Index where the newest homogeneous stretch of ``errors`` starts, and the changes found."""
    start, found = 0, []
    for _ in range(3):  # the newest change wins; three scans find it behind older ones
        cp = change_point(errors[start:], binary)
        if cp is None:
            break
        at = start + cp[0]
        found.append(
            {
                "at": at,
                "statistic": round(cp[1], 2),
                "error_before": float(errors[start:at].mean()),
                "error_after": float(errors[at:].mean()),
            }
        )
        start = at
    return start, found


# ---- the champion's family -----------------------------------------------------------------------
def champion_family(spec: PipelineSpec, model: bytes | None) -> tuple[dict[str, Any] | None, Any]:
    """The champion's family and how to train one: a BatchLearner, a river kind, or None."""
    if model is None:
        return None, None
    try:
        proto = onnx.load_model_from_string(model)
    except Exception:  # noqa: BLE001 - an unreadable champion has no family, it still competes
        return {"family": None, "from": "unreadable graph"}, None
    props = {p.key: p.value for p in proto.metadata_props}
    producer = f"{proto.producer_name} {proto.producer_version}".strip() or "unknown producer"
    if "loopline.learner" in props:
        try:
            cfg = BatchLearner.model_validate_json(props["loopline.learner"])
            return {"family": cfg.label(), "from": f"recorded learner ({producer})"}, cfg
        except ValueError:
            pass
    if props.get("learner") in _RIVER_KINDS and props.get("learner") != spec.trainer.learner:
        kind = props["learner"]
        if (
            (spec.label.task == "regression"
            and kind == "logistic_regression")
            or (spec.label.task == "classification"
            and kind == "linear_regression")
        ):
            return {"family": f"river.{kind}", "from": "recorded learner, other task"}, None
        return {"family": f"river.{kind}", "from": f"recorded learner ({producer})"}, kind
    if props.get("learner") in _RIVER_KINDS:
        return {
            "family": f"river.{props['learner']}",
            "from": "recorded learner: the incremental one",
        }, None
    ops = {n.op_type for n in proto.graph.node}
    constants = {i.name for i in proto.graph.initializer} | {
        o for n in proto.graph.node if n.op_type == "Constant" for o in n.output
    }
    # Products of inputs: skl2onnx's PolynomialFeatures multiplies gathered columns (ReduceProd),
    # hand-made graphs multiply two data tensors or raise one to a power.
    products = any(
        n.op_type == "ReduceProd"
        or (n.op_type in ("Mul", "Pow")
        and sum(i not in constants for i in n.input) >= 2 - (n.op_type == "Pow"))
        for n in proto.graph.node
    )
    if ops & _TREE_OPS:
        return (
            {
                "family": "tree ensemble",
                "from": f"operators {sorted(ops & _TREE_OPS)} ({producer})",
            },
            BatchLearner(kind="hist_gradient_boosting"),
        )
    if ops & _LINEAR_OPS and not ops & _HIDDEN_OPS:
        transforms = [Transform(kind="polynomial", degree=2)] if products else []
        what = "linear on products of inputs" if products else "linear"
        return (
            {"family": what, "from": f"operators {sorted(ops & _LINEAR_OPS)} ({producer})"},
            BatchLearner(kind="linear", transforms=transforms),
        )
    return {
        "family": None,
        "from": f"operators {sorted(ops)[:12]} ({producer}): no trainable family",
    }, None


def _same_learner(a: BatchLearner, b: BatchLearner) -> bool:
    def key(x: BatchLearner) -> tuple[Any, ...]:
        return x.kind, tuple((t.kind, t.degree, t.interaction_only) for t in x.transforms)

    return key(a) == key(b)


# ---- the tournament ------------------------------------------------------------------------------
def run(
    spec: PipelineSpec,
    holdout: Holdout,
    learner: Learner,
    trained: Ranges,
    reference: Sequence[Mapping[str, Any]],
    champion: Scorer | None,
    champion_model: bytes | None,
    name: str,
) -> Tournament:
    """Train, export and score every contender on one holdout; raise if none can be scored."""
    cfg = spec.trainer
    topic = spec.topics.features
    window = holdout.window(cfg.window)
    if not window:
        raise TournamentError(f"pipeline {spec.name}: no labeled examples to train on")
    dtype = input_dtype(champion)
    info: dict[str, Any] = {"labels": len(window)}
    start = 0
    if champion is not None:
        errors = (
            1.0 - evaluate(spec, champion, window).rows
            if spec.label.task == "classification"
            else -evaluate(spec, champion, window).rows
        )
        start, found = current_concept(errors, spec.label.task == "classification")
        info["changes"] = found
        short = 2 * min_holdout(spec) - (len(window) - start)
        if start > 0 and short > 0:
            # Learning the old concept to fill the gap would only make a candidate of the past.
            raise Deferred(spec.name, short)
    usable = window[start:]
    h = holdout_size(spec, len(usable))
    test, train = usable[-h:], usable[:-h]
    info.update(
        {
            "from": start,
            "usable": len(usable),
            "holdout": h,
            "train": len(train),
            "basis": "labels after the change in the champion's errors"
            if start
            else "the whole window",
        }
    )
    fills = fill_values(spec, reference)
    contenders: list[Contender] = []

    # The incremental learner: a copy also learns the held-back labels that are not in this holdout.
    extra = list(holdout.items)[:-h] if h < len(holdout.items) else []
    river = Contender(f"river.{learner.kind}", trained.merged(ranges_of(topic, extra)))
    try:
        clone = copy.deepcopy(learner)
        for e in extra:
            clone.learn(e.features, e.target)
        river.trained_on = clone.learned
        if clone.learned == 0:
            river.error = "has learned nothing yet"
        else:
            river.model = to_onnx(clone, name=name, input_dtype=dtype)
    except LooplineError as e:
        river.error = str(e)

    def river_refit() -> Contender:
        more = copy.deepcopy(clone)
        for e in test:
            more.learn(e.features, e.target)
        return Contender(
            river.name,
            river.ranges.merged(ranges_of(topic, test)),
            more.learned,
            to_onnx(more, name=name, input_dtype=dtype),
        )

    river.refit = river_refit
    contenders.append(river)

    family, how = champion_family(spec, champion_model)
    configs = [(b, b.label()) for b in cfg.learners]
    if isinstance(how, BatchLearner):
        same = [label for b, label in configs if _same_learner(b, how)]
        if same:
            assert family is not None
            family["in_tournament_as"] = same[0]
        else:
            configs.append((how, f"{how.label()} (champion's family)"))
    windows = [train]
    if len(train) >= 4 * min_holdout(spec):
        # A concept that creeps (or kept moving after the change) is best learned from the newest
        # labels alone: the newest half competes too, and the holdout decides which is better.
        windows.append(train[len(train) // 2 :])

    def batch(b: BatchLearner, label: str, part: list[Example], inputs: Any = None) -> Contender:
        c = Contender(label, ranges_of(topic, part), len(part))
        try:
            if not part:
                raise TournamentError("no training labels outside the holdout")
            if inputs is None:
                inputs = model_inputs(spec, [e.features for e in part], fills, dtype)
            c.model = BatchModel(spec, b, dtype).fit(inputs, [e.target for e in part]).to_onnx(name)
        except LooplineError as e:
            c.error = str(e)
        c.refit = lambda: batch(b, label, [*part, *test])
        return c

    for part in windows:
        part_inputs = model_inputs(spec, [e.features for e in part], fills, dtype) if part else None
        for b, label in configs:
            contenders.append(
                batch(
                    b, label if part is train else f"{label}@newest{len(part)}", part, part_inputs
                )
            )
    if isinstance(how, str):

        def fresh(part: list[Example]) -> Contender:
            c = Contender(f"river.{how} (champion's family)", ranges_of(topic, part), len(part))
            try:
                learner = Learner(
                    spec.model_copy(update={"trainer": cfg.model_copy(update={"learner": how})})
                )
                for e in part:
                    learner.learn(e.features, e.target)
                c.model = to_onnx(learner, name=name, input_dtype=dtype)
            except LooplineError as e:
                c.error = str(e)
            c.refit = lambda: fresh([*part, *test])
            return c

        contenders.append(fresh(train))

    for c in contenders:
        if c.model is None:
            continue
        try:
            c.evaluation = evaluate(
                spec, Scorer(c.model, spec, fills, label=f"{spec.name} {c.name}"), test
            )
        except Exception as e:  # noqa: BLE001 - one broken contender never stops the tournament
            c.error, c.model = f"{type(e).__name__}: {e}", None
    scored = [(i, c) for i, c in enumerate(contenders) if c.evaluation is not None]
    if not scored:
        raise TournamentError(
            f"pipeline {spec.name}: no contender could be trained: "
            + "; ".join(f"{c.name}: {c.error}" for c in contenders)
        )

    def rank(item: tuple[int, Contender]) -> tuple[float, float, int]:
        i, c = item
        assert c.evaluation is not None
        m = c.evaluation.metrics
        return -m["score"], m.get("log_loss", 0.0), i

    winner = min(scored, key=rank)[1]
    registered = winner
    if winner.refit is not None:
        try:
            again = winner.refit()
            if again.model is not None:
                # The refitted model must still serve: the Scorer checks its contract once more.
                Scorer(again.model, spec, fills, label=f"{spec.name} {again.name} (refitted)")
                registered = again
            else:
                info["refit_error"] = again.error
        except Exception as e:  # noqa: BLE001 - the validated winner is registered instead
            info["refit_error"] = f"{type(e).__name__}: {e}"
    info["registered"] = {
        "learner": registered.name,
        "trained_on": registered.trained_on,
        "refitted_with_holdout": registered is not winner,
    }
    champ = evaluate(spec, champion, test) if champion is not None else None
    log.info(
        "trainer_tournament",
        extra={
            "pipeline": spec.name,
            "winner": winner.name,
            "holdout": h,
            "train": len(train),
            "from": start,
            "scores": {
                c.name: (c.evaluation.metrics["score"] if c.evaluation else c.error)
                for c in contenders
            },
            "champion": champ.metrics["score"] if champ else None,
            "registered_on": registered.trained_on,
        },
    )
    return Tournament(
        contenders,
        winner,
        registered,
        champ,
        test,
        ranges_of(topic, test),
        dtype.name,
        info,
        family,
    )
