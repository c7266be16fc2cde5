"""report.html in a real browser: headless Chromium driven over the DevTools protocol.

The DevTools protocol runs over ``--remote-debugging-pipe`` (fd 3: commands in, fd 4:
replies and events out, each message JSON terminated by NUL), stdlib only: no port, no
websocket, no extra dependency. Every read has a deadline; Chromium runs in its own
process group, which is killed and reaped whatever happens.

Needs Debian's ``chromium`` package (``apt-get install -y chromium``); skips without it.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib
import select
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from vhost_conformance.reports import html, matrix
from vhost_conformance.reports.model import Verdict
from vhost_conformance.reports.sample import sample_report

CHROMIUM = pathlib.Path("/usr/bin/chromium")
ROOT = pathlib.Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "test-output"
DEADLINE_S = 30.0

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} absent (Debian package 'chromium' not installed)"
)


class DevToolsPipe:
    """A minimal DevTools-protocol client over Chromium's --remote-debugging-pipe."""

    def __init__(self, user_data_dir: pathlib.Path, log_path: pathlib.Path) -> None:
        cmd_r, self.cmd_w = os.pipe()
        self.res_r, res_w = os.pipe()
        # Move the child's ends above 10 so the shell's 3<& / 4>& redirections cannot
        # overwrite one another whatever numbers os.pipe() returned.
        child_in = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10)
        child_out = fcntl.fcntl(res_w, fcntl.F_DUPFD, 10)
        os.close(cmd_r)
        os.close(res_w)
        args = [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--remote-debugging-pipe",
            f"--user-data-dir={user_data_dir}",
            "--window-size=1280,1600",
            "about:blank",
        ]
        shell = f"exec {shlex.join(args)} 3<&{child_in} 4>&{child_out} {child_in}<&- {child_out}>&-"
        self.log = log_path.open("wb")
        try:
            self.proc = subprocess.Popen(
                ["/bin/bash", "-c", shell],  # bash: dash accepts only one-digit fds
                stdin=subprocess.DEVNULL,
                stdout=self.log,
                stderr=subprocess.STDOUT,
                pass_fds=(child_in, child_out),
                start_new_session=True,  # its own process group: we kill the whole tree
            )
        finally:
            os.close(child_in)
            os.close(child_out)
        os.set_blocking(self.res_r, False)
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def close(self) -> None:
        """Ask the browser to close, then kill its process group and reap it."""
        try:
            if self.proc.poll() is None:
                with contextlib.suppress(AssertionError, OSError, TimeoutError):
                    self.call("Browser.close", timeout=5.0)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=5.0)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10.0)
            for fd in (self.cmd_w, self.res_r):
                os.close(fd)
            self.log.close()

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no DevTools message from Chromium before the deadline")
            ready, _, _ = select.select([self.res_r], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.res_r, 1 << 20)
            if not chunk:
                raise AssertionError(f"Chromium closed the DevTools pipe (exit {self.proc.poll()})")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        message: dict[str, Any] = json.loads(raw)
        return message

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: str | None = None,
        timeout: float = DEADLINE_S,
    ) -> dict[str, Any]:
        """Send one command and wait for its result; events seen meanwhile are kept."""
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.cmd_w, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self.next_id:
                assert "error" not in reply, f"{method} failed: {reply['error']}"
                result: dict[str, Any] = reply.get("result", {})
                return result
            if "method" in reply:
                self.events.append(reply)

    def wait_event(self, method: str, session: str, timeout: float = DEADLINE_S) -> dict[str, Any]:
        """Wait for the next event *method* on *session* (or take it if already seen)."""
        for i, event in enumerate(self.events):
            if event["method"] == method and event.get("sessionId") == session:
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            event = self._read_message(deadline)
            if event.get("method") == method and event.get("sessionId") == session:
                return event
            if "method" in event:
                self.events.append(event)

    def open_page(self, url: str) -> str:
        """A new tab with Runtime/Log/Page events on, navigated to *url*, loaded; its session."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session: str = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable", session=session)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 1600, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        self.call("Page.navigate", {"url": url}, session=session)
        self.wait_event("Page.loadEventFired", session)
        return session

    def evaluate(self, session: str, expression: str) -> Any:
        """Evaluate *expression* in the page; return its JSON value; raise on an exception."""
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            session=session,
        )
        assert "exceptionDetails" not in result, f"{expression!r}: {result['exceptionDetails']}"
        return result["result"].get("value")

    def problems(self, session: str) -> list[str]:
        """Console errors, uncaught exceptions and error log entries (CSP, network) seen so far."""
        found = []
        for event in self.events:
            if event.get("sessionId") != session:
                continue
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails']}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(f"console.{params['type']}: {params.get('args')}")
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(f"log: {params['entry'].get('text')} ({params['entry'].get('url')})")
        return found


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevToolsPipe]:
    workdir = tmp_path_factory.mktemp("chromium")
    pipe = DevToolsPipe(workdir / "profile", workdir / "chromium.log")
    try:
        pipe.call("Browser.getVersion")  # proves the pipe works before any test relies on it
        yield pipe
    finally:
        pipe.close()
    assert pipe.proc.returncode is not None


def test_detector_sees_a_broken_page(browser: DevToolsPipe, tmp_path: pathlib.Path) -> None:
    """Control: the problem detector reports a script error, so silence below means something."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><title>x</title><script>noSuchFunction();</script>")
    session = browser.open_page(page.as_uri())
    time.sleep(0.2)  # let trailing events arrive; the next call drains them into .events
    browser.evaluate(session, "1")
    assert any("noSuchFunction" in p for p in browser.problems(session))


def test_detector_sees_a_csp_violation(browser: DevToolsPipe, tmp_path: pathlib.Path) -> None:
    """Control: a script the page's CSP does not allow is reported, and does not run."""
    page = tmp_path / "csp.html"
    page.write_text(
        '<!DOCTYPE html><meta http-equiv="Content-Security-Policy" content="default-src \'none\'">'
        "<title>x</title><script>document.title = 'ran';</script>"
    )
    session = browser.open_page(page.as_uri())
    time.sleep(0.2)
    assert browser.evaluate(session, "document.title") == "x"
    assert any("Content Security Policy" in p for p in browser.problems(session))


def test_report_html_in_chromium(browser: DevToolsPipe, tmp_path: pathlib.Path) -> None:
    report = sample_report()
    path = html.write(report, tmp_path / "report.html")
    session = browser.open_page(path.as_uri())
    ev = browser.evaluate
    assert ev(session, "document.body.dataset.ready") == "true", "report.js did not finish"
    counts = report.counts()
    total = len(report.cases)

    def visible() -> list[dict[str, str]]:
        rows: list[dict[str, str]] = ev(
            session,
            "Array.from(document.querySelectorAll('tbody.case'))"
            ".filter(c => !c.hidden && c.getClientRects().length > 0)"
            ".map(c => ({verdict: c.dataset.verdict, family: c.dataset.family,"
            " id: c.dataset.caseId}))",
        )
        return rows

    assert len(visible()) == total
    # Filter "fail": only failing rows, all of them.
    ev(session, "document.getElementById('filter-fail').click()")
    rows = visible()
    assert [r["verdict"] for r in rows] == ["fail"] * counts[Verdict.FAIL]
    assert ev(session, "document.getElementById('shown-count').textContent") == (
        f"{counts[Verdict.FAIL]} of {total} cases shown"
    )
    # Add "hang": union of both.
    ev(session, "document.getElementById('filter-hang').click()")
    assert sorted(r["verdict"] for r in visible()) == sorted(
        ["fail"] * counts[Verdict.FAIL] + ["hang"] * counts[Verdict.HANG]
    )
    # "all" resets, then a family filter.
    ev(session, "document.querySelector('button[data-filter-verdict=\"\"]').click()")
    assert len(visible()) == total
    ev(
        session,
        "(() => { const s = document.getElementById('filter-family'); s.value = 'stop';"
        " s.dispatchEvent(new Event('change')); })()",
    )
    rows = visible()
    assert rows and {r["family"] for r in rows} == {"stop"}
    assert len(rows) == sum(1 for c in report.cases if c.family == "stop")
    # Text search within the family filter.
    ev(
        session,
        "(() => { const t = document.getElementById('filter-text'); t.value = 'gvb-1';"
        " t.dispatchEvent(new Event('input')); })()",
    )
    assert [r["id"] for r in visible()] == ["VU-GVB-1"]
    # Plots: one stop-latency plot per in-flight count, a drain and a no-drain line in each.
    assert ev(session, "document.querySelectorAll('svg.plot-stop-latency').length") == 2
    assert (
        ev(
            session,
            "Array.from(document.querySelectorAll('svg.plot-stop-latency g.series'))"
            ".map(g => g.dataset.series).join(',')",
        )
        == "drain,no-drain,drain,no-drain"
    )
    assert ev(session, "document.querySelectorAll('svg.plot-downtime rect.bar').length") == 2
    # The wire trace of the failing MUST is collapsible and holds its messages.
    trace_rows = ev(
        session,
        "(() => { const d = document.querySelector('tbody[data-case-id=\"VU-GVB-1\"] details.trace');"
        " d.open = true; return d.querySelectorAll('tr').length; })()",
    )
    assert trace_rows == 1 + 4  # header + 4 messages
    # Hostile text stayed text: no element came from it, the one script is ours.
    assert ev(session, "document.querySelectorAll('img').length") == 0
    assert ev(session, "document.scripts.length") == 1
    assert ev(session, "document.body.textContent.includes('<script>alert(\"x\")</script>')")
    # Screenshot of the unfiltered page.
    ev(session, "document.querySelector('button[data-filter-verdict=\"\"]').click()")
    ev(
        session,
        "(() => { const s = document.getElementById('filter-family'); s.value = '';"
        " s.dispatchEvent(new Event('change')); const t = document.getElementById('filter-text');"
        " t.value = ''; t.dispatchEvent(new Event('input')); })()",
    )
    shot = browser.call("Page.captureScreenshot", {"format": "png"}, session=session)
    png = base64.b64decode(shot["data"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    OUTPUT.mkdir(exist_ok=True)
    (OUTPUT / "report-html.png").write_bytes(png)
    # And the case list, "problems" filter on, the failing MUST's trace open.
    ev(session, "document.querySelector('button[data-filter-verdict=\"problems\"]').click()")
    ev(session, "document.getElementById('cases').scrollIntoView()")
    shot = browser.call("Page.captureScreenshot", {"format": "png"}, session=session)
    (OUTPUT / "report-html-cases.png").write_bytes(base64.b64decode(shot["data"]))
    # No console error, uncaught exception, CSP violation or blocked load anywhere above.
    browser.evaluate(session, "1")
    assert browser.problems(session) == []


def test_matrix_html_in_chromium(browser: DevToolsPipe, tmp_path: pathlib.Path) -> None:
    qsd = sample_report("qsd")
    qsd = dataclasses.replace(qsd, cases=[c for c in qsd.cases if c.id != "VU-GVB-6"])
    reports = [sample_report("reference"), qsd, sample_report("dpdk-vhost-blk")]
    path = tmp_path / "matrix.html"
    path.write_text(matrix.render_html(reports))
    session = browser.open_page(path.as_uri())
    ev = browser.evaluate
    assert ev(session, "document.body.dataset.ready") == "true", "matrix.js did not finish"
    rows = "Array.from(document.querySelectorAll('table.matrix tr[data-case]'))"
    shown = ".filter(r => r.getClientRects().length > 0)"
    assert ev(session, f"{rows}.length") == len(reports[0].cases)
    cells = ev(session, "document.querySelectorAll('table.matrix td.cell').length")
    assert cells == 3 * len(reports[0].cases)
    assert ev(session, "document.querySelectorAll('svg.plot-stop-latency').length") == 2
    # The toggle: only the rows where the back-ends differ (here: the case qsd lacks),
    # and only the family headings that still have a row.
    ev(session, "document.getElementById('only-differs').click()")
    assert ev(session, f"{rows}{shown}.map(r => r.dataset.case)") == ["VU-GVB-6"]
    families = "Array.from(document.querySelectorAll('table.matrix tr.family'))"
    assert ev(session, f"{families}{shown}.map(r => r.textContent)") == ["stop"]
    assert ev(session, "document.getElementById('shown-count').textContent") == (
        f"1 of {len(reports[0].cases)} cases shown"
    )
    ev(session, "document.getElementById('only-differs').click()")
    assert ev(session, f"{rows}{shown}.length") == len(reports[0].cases)
    shot = browser.call("Page.captureScreenshot", {"format": "png"}, session=session)
    OUTPUT.mkdir(exist_ok=True)
    (OUTPUT / "matrix-html.png").write_bytes(base64.b64decode(shot["data"]))
    ev(session, "1")
    assert browser.problems(session) == []
