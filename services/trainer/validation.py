"""Contenders and champion on the same holdout: a scorecard, and the decision it supports.

Every model is scored as it would be served: its exported ONNX model (the champion: its
registered artifact) through the inference service's :class:`Scorer`. The score is accuracy
(classification) or minus the mean absolute error (regression). The tournament's winner is
accepted only if its score beats the champion's by ``trainer.margin``. The evidence section
says how sure that is: the paired gain over the champion on the same holdout rows with its 95 %
interval, a sign test on the rows where the two disagree (Bonferroni-corrected for the number of
contenders, since the winner was picked on this holdout too), and ``thin`` when the holdout is
small or the test is not significant; then a live trial, not the holdout, has the last word.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from loopline.scoring import Scorer
from loopline.services.trainer.join import Example
from loopline.services.trainer.promotion import sign_test
from loopline.spec import PipelineSpec

if TYPE_CHECKING:
    from loopline.services.trainer.tournament import Tournament

#: Below this many holdout labels the scorecard calls the evidence thin, whatever the test says.
THIN_HOLDOUT = 100
#: Corrected p-value above which the evidence is thin.
THIN_P = 0.05


@dataclass
class Evaluation:
    """One model's holdout metrics and per-row scores (1/0 correct, or minus the absolute error)."""

    metrics: dict[str, float]
    rows: np.ndarray


def evaluate(spec: PipelineSpec, scorer: Scorer, holdout: Sequence[Example]) -> Evaluation:
    """Score one model on the holdout: accuracy (and log loss) or MAE/RMSE, and the count."""
    result = scorer.score([e.features for e in holdout])
    n = len(holdout)
    if spec.label.task == "regression":
        pred = np.asarray(result.values, dtype=np.float64)
        truth = np.array([e.target for e in holdout], dtype=np.float64)
        err = pred - truth
        mae = float(np.abs(err).mean())
        return Evaluation(
            {"mae": mae, "rmse": float(np.sqrt((err**2).mean())), "score": -mae, "n": float(n)},
            -np.abs(err),
        )
    truth_labels = [e.target for e in holdout]
    right = np.array([p == t for p, t in zip(result.labels or [], truth_labels)], dtype=np.float64)
    out = {"accuracy": float(right.mean()), "score": float(right.mean()), "n": float(n)}
    if result.scores is not None:
        p_true = np.array(
            [row.get(t, 0.0) for row, t in zip(result.scores, truth_labels)], dtype=np.float64
        )
        out["log_loss"] = float(-np.log(np.clip(p_true, 1e-15, 1.0)).mean())
    return Evaluation(out, right)


def metrics(spec: PipelineSpec, scorer: Scorer, holdout: Sequence[Example]) -> dict[str, float]:
    """Holdout metrics of one model (see :func:`evaluate`)."""
    return evaluate(spec, scorer, holdout).metrics


def evidence(
    winner: Evaluation,
    champion: Evaluation | None,
    contenders: int,
    margin: float,
    direct_p: float | None,
) -> dict[str, Any]:
    """How sure the holdout is that the winner beats the champion (see the module docstring)."""
    n = int(winner.rows.size)
    if champion is None:
        thin = n < THIN_HOLDOUT
        return {
            "holdout": n,
            "thin": thin,
            "direct": False,
            "note": f"holdout of {n} labels, no champion to compare with"
            + ("; thin evidence" if thin else ""),
        }
    diff = winner.rows - champion.rows
    gain = float(diff.mean())
    se = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else float("inf")
    wins, losses = int((diff > 0).sum()), int((diff < 0).sum())
    p = sign_test(wins, losses)
    p_adj = min(1.0, p * max(1, contenders))
    thin = n < THIN_HOLDOUT or p_adj > THIN_P
    direct = direct_p is not None and p_adj < direct_p and gain >= margin - 1e-9
    note = (
        f"holdout of {n} labels: gain {gain:+.3f} "
        f"(95% CI {gain - 1.96 * se:+.3f}..{gain + 1.96 * se:+.3f}), better on {wins} rows, "
        f"worse on {losses}, sign test p={p_adj:.2g} over {contenders} contender(s)"
    )
    if direct:
        note += (
            f"; decisive (p < {direct_p:g}{', on a small holdout' if n < THIN_HOLDOUT else ''}): "
            "promoted at once, the live probation can still roll it back"
        )
    elif thin:
        note += "; thin evidence: a live trial decides"
    return {
        "holdout": n,
        "gain": gain,
        "ci95": [gain - 1.96 * se, gain + 1.96 * se],
        "wins": wins,
        "losses": losses,
        "p_value": p,
        "p_adjusted": p_adj,
        "thin": thin,
        "direct": direct,
        "note": note,
    }


def scorecard(
    spec: PipelineSpec, t: Tournament, trigger: str, champion_id: str | None
) -> dict[str, Any]:
    """The tournament's scorecard: every contender, winner vs champion, ``accepted`` and why."""
    cfg = spec.trainer
    winner = t.winner
    assert winner.evaluation is not None
    cand = winner.evaluation.metrics
    champ = t.champion.metrics if t.champion is not None else None
    margin = cfg.margin
    if champ is None:
        accepted, reason = True, "no champion to beat"
    else:
        gain = cand["score"] - champ["score"]
        accepted = gain >= margin - 1e-9  # float noise in means of 0/1
        reason = (
            f"{winner.name} {'beats' if accepted else 'does not beat'} champion by margin "
            f"{margin:g}: "
            f"score {cand['score']:.4f} vs {champ['score']:.4f} (gain {gain:+.4f})"
        )
    scored = [c for c in t.contenders if c.evaluation is not None]
    proof = evidence(
        winner.evaluation,
        t.champion,
        len(scored),
        margin,
        cfg.direct_promotion_p if spec.deployment.promotion == "auto" else None,
    )
    rows = [c.row(c is winner) for c in t.contenders]
    if champ is not None:
        rows.append(
            {
                "learner": f"champion {champion_id}",
                "score": champ["score"],
                "metrics": champ,
                "trained_on": None,
                "winner": False,
                "error": None,
            }
        )
    board = ", ".join(
        f"{r['learner']} {r['score']:.3f}" if r["score"] is not None else f"{r['learner']} failed"
        for r in sorted(rows, key=lambda r: -(r["score"] if r["score"] is not None else -1e18))
    )
    summary = (
        f"{'accepted' if accepted else 'rejected'} {winner.name} (trigger {trigger}); {board}; "
        f"{proof['note']}"
    )
    return {
        "accepted": accepted,
        "reason": reason,
        "trigger": trigger,
        "margin": margin,
        "metric": "mae" if spec.label.task == "regression" else "accuracy",
        "winner": winner.name,
        "candidate": cand,
        "champion": champ,
        "champion_version": champion_id,
        "contenders": rows,
        "champion_family": t.family,
        "window": t.window_info,
        "evidence": proof,
        "input_type": t.input_type,
        "holdout": t.holdout_ranges.summary(),
        "training": t.registered.ranges.summary(),
        "summary": summary,
    }


def version_metrics(card: dict[str, Any]) -> dict[str, float]:
    """The flat metrics map stored with a registered version."""
    out = {f"holdout_{k}": v for k, v in card["candidate"].items()}
    if card["champion"] is not None:
        out.update({f"holdout_champion_{k}": v for k, v in card["champion"].items()})
    out["training_examples"] = float(card["training"]["count"])
    return out
