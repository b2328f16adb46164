"""Structured logs, Prometheus metrics and the health/readiness endpoint every service exposes."""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from confluent_kafka import KafkaError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_DIGITS = re.compile(r"\d+")
# librdkafka error codes that mean the broker cannot be reached (or will not let us in).
_BROKER_DOWN_CODES = {KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT,
                      KafkaError._AUTHENTICATION}


def bounded(value: Any, limit: int = 200) -> str:
    """A value for a log line or a message: at most
    ``limit`` characters, longer ones with size and hash."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode(errors="replace")).hexdigest()[:12]
    return f"{text[:limit]}... [{len(text)} chars, sha256 {digest}]"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event, and the record's ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one JSON line."""
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _RESERVED})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class ConsoleFormatter(logging.Formatter):
    """``HH:MM:SS level event key=value ...`` for people at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one readable line."""
        extras = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in _RESERVED)
        when = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{when} {record.levelname.lower():7} {record.getMessage()} {extras}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class RepeatFilter(logging.Filter):
    """Lets one line through per kind of message and window; counts the others into the next one.

    librdkafka repeats the same connection error many times a second while a broker is away;
    one line per ``window_s`` (digits ignored when comparing) says the same.
    """

    def __init__(self, window_s: float = 30.0) -> None:
        super().__init__()
        self.window_s = window_s
        self._seen: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether to emit ``record`` (a repeat within the window is counted, not emitted)."""
        kind = _DIGITS.sub("#", record.getMessage())[:200]
        now = time.monotonic()
        last = self._seen.get(kind)
        if last is not None and now - last[0] < self.window_s:
            self._seen[kind] = (last[0], last[1] + 1)
            return False
        if last is not None and last[1]:
            record.suppressed_repeats = last[1]
        if len(self._seen) > 1000:
            self._seen.clear()
        self._seen[kind] = (now, 0)
        return True


class RebalanceTxnFilter(logging.Filter):
    """librdkafka logs a transaction that a consumer-group rebalance made abortable at error
    level ("TXNERR ... ILLEGAL_GENERATION"); the runtime aborts it and processes the batch again
    (nothing lost, nothing doubled), so it is a warning."""

    HANDLED = ("ILLEGAL_GENERATION", "UNKNOWN_MEMBER_ID", "REBALANCE_IN_PROGRESS",
               "FENCED_INSTANCE_ID")

    def filter(self, record: logging.LogRecord) -> bool:
        """Downgrade a handled rebalance TXNERR to a warning; let every record through."""
        if record.levelno > logging.WARNING:
            message = record.getMessage()
            if "TXNERR" in message and any(code in message for code in self.HANDLED):
                record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class RateCapFilter(logging.Filter):
    """Lets at most ``burst`` info (or debug) lines of one kind through per ``window_s``.

    A kind is the logger and the event name. A line that repeats per batch would otherwise write
    many lines a second: a person reading the log (or ``tail -f``) sees the first ``burst`` of a
    window, and the next line let through carries ``suppressed``, how many were left out since.
    Warnings and errors always pass.
    """

    def __init__(self, burst: int = 10, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst, self.window_s, self._clock = burst, window_s, clock
        # kind -> [window start, lines let through in it, lines left out not yet reported]
        self._kinds: dict[tuple[str, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether to emit ``record``; a capped one is counted into the next emitted line."""
        if record.levelno >= logging.WARNING:
            return True
        kind = (record.name, str(record.msg)[:200])
        now = self._clock()
        state = self._kinds.get(kind)
        if state is None:
            if len(self._kinds) > 1000:
                self._kinds.clear()
            state = self._kinds[kind] = [now, 0, 0]
        if now - state[0] >= self.window_s:
            state[0], state[1] = now, 0
        if state[1] >= self.burst:
            state[2] += 1
            return False
        if state[2]:
            record.suppressed = int(state[2])
            state[2] = 0
        state[1] += 1
        return True


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Send the root logger's records to stderr, one line each (librdkafka's: warnings, deduped).

    Info lines are capped per kind (:class:`RateCapFilter`), so a log stays readable.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    handler.addFilter(RateCapFilter())
    handler.set_name("loopline")
    root = logging.getLogger()
    # Replace only our own handler, so calling this twice (or under pytest) keeps other handlers.
    root.handlers[:] = [h for h in root.handlers if h.get_name() != "loopline"] + [handler]
    root.setLevel(level)
    librdkafka = logging.getLogger("librdkafka")
    librdkafka.setLevel(max(logging.getLevelName(level), logging.WARNING))
    if not any(isinstance(f, RepeatFilter) for f in librdkafka.filters):
        librdkafka.addFilter(RebalanceTxnFilter())
        librdkafka.addFilter(RepeatFilter())


class Health:
    """Liveness (the main loop beats) and readiness (the service can do its job right now).

    Readiness is false while the service says so (``set_ready``), while it joins its consumer
    group, while the broker is unreachable (librdkafka reported all brokers down and nothing
    succeeded since), and while one batch has been in hand longer than ``stuck_after_s``.
    """

    def __init__(self, stale_after_s: float = 60.0, stuck_after_s: float = 30.0,
                 broker_grace_s: float = 5.0) -> None:
        self.stale_after_s = stale_after_s
        self.stuck_after_s = stuck_after_s
        self.broker_grace_s = broker_grace_s
        self._lock = threading.Lock()
        self._last_beat = time.monotonic()
        self._ready = False
        self._reason = "starting"
        self._assigned: bool | None = None  # None: readiness does not wait for a group assignment
        self._busy_since: float | None = None
        self._broker_down: tuple[float, str] | None = None

    def beat(self) -> None:
        """Record that the main loop is making progress."""
        self._last_beat = time.monotonic()

    def busy(self) -> None:
        """A batch is being processed from now on."""
        self._busy_since = time.monotonic()

    def idle(self) -> None:
        """The batch in hand is done."""
        self._busy_since = None

    def broker_error(self, error: Any) -> None:
        """A librdkafka error callback: all brokers down
        (or authentication failing) marks it down."""
        code = error.code()
        if code in _BROKER_DOWN_CODES:
            with self._lock:
                if self._broker_down is None:
                    self._broker_down = (time.monotonic(), error.str())

    def broker_ok(self) -> None:
        """Something reached the broker (a commit, a fetch, a metadata answer)."""
        self._broker_down = None

    def broker_suspect(self) -> bool:
        """Whether a broker error was reported and nothing has succeeded since."""
        return self._broker_down is not None

    def broker_unreachable(self) -> str | None:
        """Why the broker counts as unreachable now, or None."""
        down = self._broker_down
        if down is not None and time.monotonic() - down[0] >= self.broker_grace_s:
            return f"broker unreachable for {time.monotonic() - down[0]:.0f}s: {down[1]}"
        return None

    def set_ready(self, ready: bool, reason: str = "") -> None:
        """Mark the service ready (or not, and why)."""
        with self._lock:
            self._ready, self._reason = ready, reason or ("ready" if ready else "not ready")

    def expect_assignment(self) -> None:
        """From now on, readiness also waits until the consumer group assigned this member."""
        self._assigned = False

    def assigned(self, *_: object) -> None:
        """Record the group's assignment; usable directly as a consumer ``on_assign`` callback."""
        self._assigned = True

    def live(self) -> tuple[bool, str]:
        """Whether the loop beat recently enough, and a reason."""
        age = time.monotonic() - self._last_beat
        if age > self.stale_after_s:
            return False, f"main loop silent for {age:.0f}s"
        return True, "alive"

    def ready(self) -> tuple[bool, str]:
        """Whether the service is live and ready, and a reason."""
        alive, why = self.live()
        if not alive:
            return False, why
        down = self.broker_unreachable()
        if down is not None:
            return False, down
        busy = self._busy_since
        if busy is not None and time.monotonic() - busy > self.stuck_after_s:
            return False, f"one batch in hand for {time.monotonic() - busy:.0f}s"
        if self._assigned is False:
            return False, "joining the consumer group"
        with self._lock:
            return self._ready, self._reason


#: A client that hangs up before reading its answer (a health probe with a short timeout, a
#: port scan at start-up) is normal for a metrics endpoint, not an error worth a traceback.
_HUNG_UP = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


class _QuietHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that ignores clients hanging up and logs other errors as one line."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Instead of socketserver's traceback on stderr: nothing for a hang-up, else a log line."""
        error = sys.exc_info()[1]
        if isinstance(error, _HUNG_UP):
            return
        logging.getLogger(__name__).warning("metrics_request_failed", exc_info=True,
                                            extra={"client": str(client_address)})


class MetricsServer:
    """HTTP server on its own thread: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``."""

    def __init__(self, registry: CollectorRegistry, health: Health, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.registry = registry
        self.health = health
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # http.server's naming
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(server.registry), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    health = server.health
                    ok, reason = health.live() if path == "/healthz" else health.ready()
                    body = orjson.dumps({"status": "ok" if ok else "unavailable", "reason": reason})
                    self._send(200 if ok else 503, body, "application/json")
                else:
                    self._send(404, b'{"error": "not found; try /metrics, /healthz, /readyz"}',
                               "application/json")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
                pass  # scrapes every few seconds are not events worth a log line

        self._httpd = _QuietHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics",
                                        daemon=True)

    @property
    def address(self) -> str:
        """``http://host:port`` the server listens on."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> MetricsServer:
        """Start serving in the background."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
