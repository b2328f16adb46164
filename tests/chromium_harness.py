"""Headless Chromium driven over the DevTools protocol on a pipe (no port, no network).

:func:`render` opens a local HTML file, waits until the page says its charts are done, measures
what each chart drew, collects every script error, console error and network request, and takes a
full-page screenshot. Imported by the report's browser tests (a plain module, not a test file).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The flags the brief asks for: nothing in the background, nothing from the network.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
)

# What every chart drew: its box, its SVG roots, and how many of the traces the chart was given
# (Plotly keeps them on the element as .data) painted at least one mark with a non-empty box.
_MEASURE = """
JSON.stringify(Array.from(document.querySelectorAll('.plot')).map(function (el) {
  var box = el.getBoundingClientRect();
  var traces = Array.from(el.querySelectorAll('.cartesianlayer .trace'));
  var painted = traces.filter(function (t) {
    return Array.from(t.querySelectorAll('path, .point')).some(function (p) {
      var b = p.getBoundingClientRect(); return b.width > 0 || b.height > 0; });
  });
  var canvases = Array.from(el.querySelectorAll('canvas'))
    .filter(function (c) { return c.width > 0 && c.height > 0; });
  return {id: el.id, drawn: el.dataset.drawn || null, width: box.width, height: box.height,
          svgs: el.querySelectorAll('svg.main-svg').length, given: (el.data || []).length,
          traces: traces.length, painted: painted.length, canvases: canvases.length,
          legend: Array.from(el.querySelectorAll('.legendtext')).map(function (t) {
            return t.textContent; }),
          xtitle: (el.querySelector('.g-xtitle') || {}).textContent || '',
          ytitle: (el.querySelector('.g-ytitle') || {}).textContent || ''};
}))
"""


@dataclass
class Rendered:
    """What the browser made of a page."""

    charts: list[dict[str, Any]]
    state: str | None  # document.body.dataset.charts at the end
    errors: list[str] = field(default_factory=list)  # exceptions, console and log errors
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    screenshot: Path | None = None


class _Pipe:
    """Chromium's DevTools pipe: NUL-terminated JSON messages on fds 3 (in) and 4 (out)."""

    def __init__(self, chromium: str, profile: Path) -> None:
        to_read, self._write = os.pipe()
        self._read, from_write = os.pipe()
        # Far from 3 and 4, so bash can put them there whatever numbers they had here.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in (to_read, from_write)]
        for fd in (to_read, from_write):
            os.close(fd)
        script = f'exec "$@" 3<&{high[0]} 4>&{high[1]} {high[0]}<&- {high[1]}>&-'
        # Its own log goes to a file: a pipe nobody drains would stall the browser once full.
        self.log = profile / "chromium.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    "bash",
                    "-c",
                    script,
                    "chromium",
                    chromium,
                    *FLAGS,
                    f"--user-data-dir={profile}",
                    "about:blank",
                ],
                pass_fds=tuple(high),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        for fd in high:
            os.close(fd)
        self._buffer = b""
        self._next = 0
        self.events: list[dict[str, Any]] = []

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout_s: float = 30.0,
    ) -> dict[str, Any]:
        """One command; returns its result (raises on a protocol error)."""
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout_s: float) -> dict[str, Any]:
        """The next event called ``method`` (earlier events are kept)."""
        for e in self.events:
            if e.get("method") == method:
                return e
        deadline = time.monotonic() + timeout_s
        while True:
            event = self._receive(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def _receive(self, deadline: float) -> dict[str, Any]:
        import select

        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            ready, _, _ = select.select([self._read], [], [], left)
            if ready:
                chunk = os.read(self._read, 1 << 20)
                if not chunk:
                    raise RuntimeError(
                        "chromium closed its DevTools pipe: "
                        + self.log.read_text(errors="replace")[-2000:]
                    )
                self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(raw)  # type: ignore[no-any-return]  # JSON is Any

    def close(self) -> None:
        """Ask the browser to quit; kill it if it does not."""
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.send("Browser.close", timeout_s=5)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        for fd in (self._read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)


def chromium() -> str:
    """The chromium binary (Debian's package); fail loudly without it."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "chromium is not installed: apt-get install -y chromium (.ci/run does it)"
    return found


def render(page: Path, screenshot: Path, width: int = 1280, timeout_s: float = 60.0) -> Rendered:
    """Open ``page`` in headless Chromium, wait for its charts, measure them, take a screenshot."""
    with tempfile.TemporaryDirectory(prefix="loopline-chromium-") as profile:
        pipe = _Pipe(chromium(), Path(profile))
        try:
            target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
                "sessionId"
            ]
            for domain in ("Runtime", "Log", "Page", "Network"):
                pipe.send(f"{domain}.enable", session=session)
            pipe.send(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
                session=session,
            )
            pipe.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
            pipe.wait_for("Page.loadEventFired", timeout_s)
            deadline, state = time.monotonic() + timeout_s, None
            while state not in ("drawn", "failed") and time.monotonic() < deadline:
                state = _evaluate(pipe, session, "document.body.dataset.charts || null")
                if state not in ("drawn", "failed"):
                    time.sleep(0.1)
            time.sleep(0.3)  # let transitions and the last layout settle before measuring
            charts = json.loads(_evaluate(pipe, session, _MEASURE))
            height = int(_evaluate(pipe, session, "document.documentElement.scrollHeight"))
            pipe.send(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                session=session,
            )
            time.sleep(0.5)  # responsive charts re-lay out for the taller viewport
            shot = pipe.send(
                "Page.captureScreenshot",
                {"format": "png", "captureBeyondViewport": True},
                session=session,
                timeout_s=timeout_s,
            )
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            result = Rendered(charts, state, screenshot=screenshot)
            for e in pipe.events:
                method, params = e.get("method"), e.get("params", {})
                if method == "Runtime.exceptionThrown":
                    d = params["exceptionDetails"]
                    result.errors.append(
                        f"exception: {d.get('text')} "
                        f"{(d.get('exception') or {}).get('description', '')}"
                    )
                elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                    result.errors.append(
                        "console.error: "
                        + " ".join(
                            str(a.get("value", a.get("description", "")))
                            for a in params.get("args", [])
                        )
                    )
                elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                    result.errors.append(f"log: {params['entry'].get('text')}")
                elif method == "Network.requestWillBeSent":
                    result.requests.append(params["request"]["url"])
            return result
        finally:
            pipe.close()


def _evaluate(pipe: _Pipe, session: str, expression: str) -> Any:
    reply = pipe.send(
        "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session
    )
    if "exceptionDetails" in reply:
        raise RuntimeError(f"evaluating {expression[:60]!r}: {reply['exceptionDetails']}")
    return reply["result"].get("value")
