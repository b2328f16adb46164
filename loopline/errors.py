"""The exceptions Loopline raises; every one derives from :class:`LooplineError`."""

from __future__ import annotations


class LooplineError(Exception):
    """Base class of every error Loopline raises on purpose."""


class ConfigError(LooplineError):
    """A setting or the environment is unusable (no broker found, bad value)."""


class SpecError(LooplineError):
    """A pipeline spec breaks a rule; ``problems`` lists each as ``(field, rule, message)``."""

    def __init__(self, source: str, problems: list[tuple[str, str, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = [f"{source}: invalid pipeline spec ({len(problems)} problem(s))"]
        lines += [f"  - {field}: {message} [rule: {rule}]" for field, rule, message in problems]
        super().__init__("\n".join(lines))


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
