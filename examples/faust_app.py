"""A Faust app on a Loopline pipeline: served predictions per key and label; accepts confident ones.

For every served prediction it updates a table keyed by the prediction's key (how many were
served, how many of each label, how many accepted: a running accept rate per key), and sends an
``accept`` verdict to the pipeline's feedback topic when the served label's score reaches
``LOOPLINE_FAUST_MIN_SCORE``. That rule stands in for your business outcome: send
``verdict="reject"`` or ``label=...`` once you know the truth, since the trainer learns from it.

Run it against a broker where the pipeline is applied (``loopline apply examples/sea.yaml``)::

    LOOPLINE_BOOTSTRAP_SERVERS=127.0.0.1:9092 LOOPLINE_FAUST_PIPELINE=sea \\
        python examples/faust_app.py worker -l info

On the embedded broker reached through LOOPLINE_BOOTSTRAP_SERVERS also set
``LOOPLINE_KAFKA_PROFILE=embedded`` (see :func:`loopline.faust.app_settings`). The app is built in
``main()`` from the settings, not at import, so it runs as a script rather than ``faust -A``; every
Faust command works after the script name (``worker``, ``tables``, ...).
"""

from __future__ import annotations

import logging
import sys
import uuid
from typing import Any

import faust
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from loopline import faust as lf
from loopline.errors import LooplineError
from loopline.settings import LooplineSettings

log = logging.getLogger("loopline.examples.faust_app")
_FEEDBACK_IDS = uuid.UUID("2f3c8a4e-9a51-4b8e-8d0a-6b1f0f8e7c21")


class ExampleSettings(BaseSettings):
    """What this app does; the broker and security come from the usual LOOPLINE_* variables."""

    model_config = SettingsConfigDict(env_prefix="LOOPLINE_FAUST_", extra="ignore", frozen=True)

    pipeline: str = Field(description="The Loopline pipeline whose predictions are read.")
    app_id: str = Field("loopline-faust-example", description="Faust app id: consumer group, "
                        "changelog topic prefix.")
    min_score: float = Field(0.9, gt=0, le=1,
                             description="Accept a served label whose score reaches this.")
    web_enabled: bool = Field(False, description="Faust's web server (port 6066 unless set).")


class KeyStats(faust.Record, namespace="loopline.examples.KeyStats"):
    """A table value: one key's served predictions; ``partition``/``offset``: the last counted."""

    served: int = 0
    accepted: int = 0
    labels: dict[str, int] = {}  # noqa: RUF012 - shared default, never changed in place
    partition: int = -1
    offset: int = -1

    def accept_rate(self) -> float:
        """Share of this key's served predictions that were accepted."""
        return self.accepted / self.served if self.served else 0.0


def feedback_id(app_id: str, prediction_id: str) -> str:
    """The same id for every resend of this app's verdict on a prediction: duplicates show."""
    return str(uuid.uuid5(_FEEDBACK_IDS, f"{app_id}/{prediction_id}"))


def decide(prediction: Any, min_score: float) -> str | None:
    """The verdict on a served prediction, or None to send nothing (stand-in business rule)."""
    if prediction.label is None:
        return None
    return "accept" if prediction.scores.get(prediction.label, 0.0) >= min_score else None


def create_app(settings: LooplineSettings, example: ExampleSettings) -> faust.App:
    """Build the app: topics from the registry, the per-key table and the review agent."""
    datadir = settings.home / "faust" / example.app_id
    datadir.parent.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
    app = faust.App(example.app_id, **lf.app_settings(settings), web_enabled=example.web_enabled,
                    datadir=str(datadir), store="memory://")
    topics = lf.from_registry(app, settings, example.pipeline)
    # Co-partitioned with the predictions topic: a key's table entry lives where its events are.
    per_key = app.Table("served-per-key", default=KeyStats, key_type=str, value_type=KeyStats,
                        partitions=topics.predictions.partitions)

    @app.agent(topics.predictions)
    async def review(stream: faust.StreamT) -> None:
        async for event in stream.events():
            p, message = event.value, event.message
            if not p.served:
                continue  # shadows and challengers not served are not our business
            key = event.key or p.event_id
            stats = per_key[key]
            if stats.partition == message.partition and message.offset <= stats.offset:
                continue  # redelivered after a restart (at-least-once): counted already
            verdict = decide(p, example.min_score)
            if verdict is not None:
                fid = feedback_id(example.app_id, p.prediction_id)
                record = topics.feedback_record(prediction_id=p.prediction_id, verdict=verdict,
                                                feedback_id=fid)
                await topics.feedback.send(key=p.prediction_id, value=record)
            labels = dict(stats.labels)
            label = p.label if p.label is not None else "(regression)"
            labels[label] = labels.get(label, 0) + 1
            stats = KeyStats(served=stats.served + 1, labels=labels,
                             accepted=stats.accepted + (verdict == "accept"),
                             partition=message.partition, offset=message.offset)
            per_key[key] = stats
            log.info("prediction_reviewed", extra={"key": key, "prediction_id": p.prediction_id,
                                                   "verdict": verdict,
                                                   "accept_rate": round(stats.accept_rate(), 4)})

    return app


def main() -> None:
    """Read the settings, build the app and hand the command line to Faust (``worker``, ...)."""
    try:
        example = ExampleSettings()  # type: ignore[call-arg]  # read from the environment
        app = create_app(LooplineSettings(), example)
    except ValidationError as e:  # name the environment variables, not the model fields
        prefix = "LOOPLINE_FAUST_" if e.title == ExampleSettings.__name__ else "LOOPLINE_"
        problems = "; ".join(f"{prefix}{'_'.join(map(str, err['loc'])).upper()}: {err['msg']}"
                             for err in e.errors())
        raise SystemExit(f"faust_app: {problems}") from None
    except LooplineError as e:
        raise SystemExit(f"faust_app: {e}") from None
    # Faust's `worker` command turns the web server on unless told otherwise, whatever the app's
    # web_enabled says: pass the setting on, so that two workers can share a host.
    if "worker" in sys.argv[1:] and not {"--with-web", "--without-web"} & set(sys.argv):
        sys.argv.append("--with-web" if example.web_enabled else "--without-web")
    app.main()


if __name__ == "__main__":
    main()
