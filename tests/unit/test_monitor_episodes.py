"""Alerts are raised once per episode, escalate once, and resolve once."""

from __future__ import annotations

from loopline import avro
from loopline.services.monitor.episodes import EpisodeKey, Episodes


def test_one_raise_and_one_resolve_per_episode() -> None:
    e = Episodes("p")
    key = EpisodeKey("drift", "amount", "adwin")
    events = [e.observe(key, level, f"level {level}", at=i, offset=i, statistic=1.0)
              for i, level in enumerate([None, "alert", "alert", "alert", "warning", None, None])]
    sent = [x for x in events if x is not None]
    assert [(x["state"], x["severity"]) for x in sent] == [("raised", "alert"),
                                                           ("resolved", "alert")]
    assert sent[0]["first_offset"] == 1
    assert sent[1]["last_offset"] == 5 and sent[1]["first_offset"] == 1
    assert sent[0]["feature"] == "amount" and sent[0]["detector"] == "adwin"
    for x in sent:
        avro.codec("alert").encode(x)  # fits the schema


def test_escalation_from_warning_to_alert_is_reported_once() -> None:
    e = Episodes("p")
    key = EpisodeKey("drift", "amount", "psi_ks", "m", 1)
    levels = ["warning", "warning", "alert", "alert", "warning", None]
    sent = [x for i, lv in enumerate(levels) if (x := e.observe(key, lv, "m", at=i)) is not None]
    assert [(x["state"], x["severity"]) for x in sent] == [
        ("raised", "warning"), ("raised", "alert"), ("resolved", "alert")]
    assert len({x["alert_id"] for x in sent}) == 3
    assert sent[0]["model_name"] == "m" and sent[0]["model_version"] == 1


def test_alert_ids_are_stable_for_a_replay_and_new_for_a_new_episode() -> None:
    key = EpisodeKey("quality", "x", "missing")
    a, b = Episodes("p"), Episodes("p")
    first = a.observe(key, "alert", "m", at=1)
    assert first is not None and first == b.observe(key, "alert", "m", at=1)
    a.observe(key, None, "m", at=2)
    second = a.observe(key, "alert", "m", at=1)
    assert second is not None and second["alert_id"] != first["alert_id"]


def test_keys_are_independent() -> None:
    e = Episodes("p")
    assert e.observe(EpisodeKey("drift", "a", "adwin"), "alert", "m", at=1) is not None
    assert e.observe(EpisodeKey("drift", "b", "adwin"), "alert", "m", at=1) is not None
    assert e.observe(EpisodeKey("drift", "a", "adwin"), "alert", "m", at=2) is None
