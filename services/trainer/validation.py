"""Candidate vs champion on the same holdout: a scorecard, and the decision it supports.

Both are scored as they would be served: the candidate's exported ONNX model and the champion's
registered artifact, each through the inference service's :class:`Scorer`. The score is accuracy
(classification) or minus the mean absolute error (regression); the candidate is accepted only if
its score beats the champion's by ``trainer.margin``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from loopline.scoring import Scorer
from loopline.services.trainer.data import Ranges
from loopline.services.trainer.join import Example
from loopline.spec import PipelineSpec


def metrics(spec: PipelineSpec, scorer: Scorer, holdout: Sequence[Example]) -> dict[str, float]:
    """Holdout metrics of one model: accuracy (and log loss) or MAE/RMSE, with the sample count."""
    result = scorer.score([e.features for e in holdout])
    n = len(holdout)
    if spec.label.task == "regression":
        pred = np.asarray(result.values, dtype=np.float64)
        truth = np.array([e.target for e in holdout], dtype=np.float64)
        err = pred - truth
        mae = float(np.abs(err).mean())
        return {"mae": mae, "rmse": float(np.sqrt((err ** 2).mean())), "score": -mae, "n": float(n)}
    truth_labels = [e.target for e in holdout]
    acc = float(np.mean([p == t for p, t in zip(result.labels or [], truth_labels)]))
    out = {"accuracy": acc, "score": acc, "n": float(n)}
    if result.scores is not None:
        p_true = np.array([row.get(t, 0.0) for row, t in zip(result.scores, truth_labels)], dtype=np.float64)
        out["log_loss"] = float(-np.log(np.clip(p_true, 1e-15, 1.0)).mean())
    return out


def scorecard(spec: PipelineSpec, candidate: Scorer, champion: Scorer | None, holdout: Sequence[Example],
              holdout_ranges: Ranges, training: Ranges, trigger: str,
              champion_id: str | None) -> dict[str, Any]:
    """Score both on the holdout; return the scorecard with ``accepted`` and the reason."""
    cand = metrics(spec, candidate, holdout)
    champ = metrics(spec, champion, holdout) if champion is not None else None
    margin = spec.trainer.margin
    if champ is None:
        accepted, reason = True, "no champion to beat"
    else:
        gain = cand["score"] - champ["score"]
        accepted = gain >= margin - 1e-9  # float noise in means of 0/1
        reason = (f"candidate {'beats' if accepted else 'does not beat'} champion by margin {margin:g}: "
                  f"score {cand['score']:.4f} vs {champ['score']:.4f} (gain {gain:+.4f})")
    return {
        "accepted": accepted, "reason": reason, "trigger": trigger, "margin": margin,
        "metric": "mae" if spec.label.task == "regression" else "accuracy",
        "candidate": cand, "champion": champ, "champion_version": champion_id,
        "holdout": holdout_ranges.summary(), "training": training.summary(),
    }


def version_metrics(card: dict[str, Any]) -> dict[str, float]:
    """The flat metrics map stored with a registered version."""
    out = {f"holdout_{k}": v for k, v in card["candidate"].items()}
    if card["champion"] is not None:
        out.update({f"holdout_champion_{k}": v for k, v in card["champion"].items()})
    out["training_examples"] = float(card["training"]["count"])
    return out
