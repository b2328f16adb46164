"""The exceptions Loopline raises; every one derives from :class:`LooplineError`.

One hierarchy, one root. The core's errors live here; each service's own live in
``services/<name>/errors.py`` (installed as ``loopline.services.<name>.errors``) and derive from
the same root. The modules that raise an error also import it, so
``loopline.artifacts.ArtifactError`` and the like stay importable where they always were.

Errors that say which field broke which rule share :class:`RuleError` (``field``, ``rule``,
``message``): pipeline specs (:class:`SpecError`, with every problem), registry records, feedback
messages, events the SDK refuses and artifacts.

Three exceptions deliberately stand outside the hierarchy, because they are signals that never
reach a user: ``loopline.runtime.delivery.RetryBatch`` (the run loop retries the batch),
``loopline.avro.readers.Unsupported`` (the generated codec falls back to fastavro) and
``loopline.app.up.StopRequested`` (a ``BaseException``, like ``KeyboardInterrupt``).
"""

from __future__ import annotations


class LooplineError(Exception):
    """Base class of every error Loopline raises on purpose."""


class RuleError(LooplineError):
    """A value breaks a named rule: ``field`` (None: the whole record), ``rule`` and ``message``.

    ``text`` is the exception's text when the subclass words it its own way; by default it is
    ``"<field>: <message> (rule: <rule>)"``.
    """

    def __init__(self, field: str | None, rule: str, message: str, text: str | None = None) -> None:
        self.field, self.rule, self.message = field, rule, message
        if text is None:
            text = f"{field or '(record)'}: {message} (rule: {rule})"
        super().__init__(text)


class ConfigError(LooplineError):
    """A setting or the environment is unusable (no broker found, bad value)."""


class SpecError(RuleError):
    """A pipeline spec breaks a rule; ``problems`` lists each as ``(field, rule, message)``.

    ``field``, ``rule`` and ``message`` are those of the first problem.
    """

    def __init__(self, source: str, problems: list[tuple[str, str, str]]) -> None:
        self.source = source
        lines = [f"{source}: invalid pipeline spec ({len(problems)} problem(s))"]
        lines += [f"  - {field}: {message} [rule: {rule}]" for field, rule, message in problems]
        field, rule, message = problems[0] if problems else (None, "spec", "invalid pipeline spec")
        super().__init__(field, rule, message, "\n".join(lines))
        self.problems = problems


class SchemaError(LooplineError):
    """A message does not match its Avro schema, or a schema change is incompatible."""


class BrokerError(LooplineError):
    """The embedded broker could not be started, reached or stopped."""


class DeliveryError(LooplineError):
    """Kafka did not acknowledge a produced message."""


class ClientStuck(LooplineError):
    """A Kafka client call did not return within its timeout; the process must start over.

    librdkafka can block in a transactional call past its timeout when a coordinator went away
    (librdkafka#5456). The state of such a client is unknown, so the service exits non-zero and its
    supervisor starts it again; a restarted replica aborts what this one left open.
    """


class StateError(LooplineError):
    """A state record cannot be read: corrupt, of another format, or not made of allowed classes."""


class ArtifactError(RuleError):
    """An artifact is missing, unreadable, too large, not a regular file, or fails its sha256."""

    def __init__(self, message: str, rule: str = "readable") -> None:
        super().__init__(None, rule, message, message)


class RegistryRecordError(RuleError):
    """A registry record breaks a rule; ``field`` and ``rule`` say where and which."""

    field: str

    def __init__(self, field: str, rule: str, message: str) -> None:
        super().__init__(field, rule, message, f"{field}: {message} (rule: {rule})")


class RegistrationError(LooplineError):
    """A model version cannot be registered or changed; the message names the rule."""


class ModelRefError(LooplineError):
    """A model reference does not parse, or names no version of the registry."""


class ModelError(LooplineError):
    """A model does not fit the pipeline's input/output contract or fails to score."""


class ProfileError(LooplineError):
    """A model could not be measured; the message says which and why."""


class FeedbackError(RuleError):
    """A feedback message breaks a rule; ``field`` and ``rule`` say which."""

    def __init__(self, field: str | None, rule: str, message: str) -> None:
        super().__init__(field, rule, message, message)


class ValidationError(RuleError):
    """An event does not fit the pipeline spec; ``field`` and ``rule`` say where and why."""

    def __init__(self, field: str | None, rule: str, message: str) -> None:
        super().__init__(field, rule, message, f"{field or '(event)'}: {message} [rule: {rule}]")
