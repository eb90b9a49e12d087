"""Render a local HTML page in headless Chromium and report what the browser itself saw, with the standard library
only: the DevTools protocol over ``--remote-debugging-pipe`` (NUL-terminated JSON on file descriptors 3 and 4),
so no websocket client and no script inside the page are needed.

``render`` loads the page, waits for its load event (every image has then loaded or failed), reads each
``<img>``'s ``complete`` / ``naturalWidth`` / ``naturalHeight`` from the live DOM, and saves a screenshot of the
whole page.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
IMAGES_JS = ("Array.from(document.images).map(i => ({src: i.getAttribute('src'), complete: i.complete, "
             "width: i.naturalWidth, height: i.naturalHeight}))")


def find_chromium() -> str | None:
    """The browser binary: ``$RAYBENCH_CHROMIUM``, else the first of the usual names on PATH; None if none."""
    explicit = os.environ.get("RAYBENCH_CHROMIUM")
    if explicit:
        return explicit if shutil.which(explicit) else None
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


@dataclass
class Rendered:
    images: list[dict]  # per <img> in document order: src, complete, width, height (natural pixels)
    title: str
    text: str  # document.body.innerText
    screenshot: Path
    page_size: tuple[int, int]  # CSS pixels of the whole document


class _Pipe:
    """One browser process and its DevTools pipe; commands answered in order, events kept until waited for."""

    def __init__(self, binary: str, width: int, height: int, profile: str) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # the browser expects the pipe on fds 3 (commands in) and 4 (replies out): put them there in the child
        child_in = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_browser_r)
        os.close(from_browser_w)

        def wire() -> None:
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [binary, "--headless", "--disable-gpu", "--no-sandbox", "--remote-debugging-pipe",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
             f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=wire, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        os.close(child_in)
        os.close(child_out)
        self._buffer = b""
        self._next = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        reply = self.wait(lambda m: m.get("id") == self._next, timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait(self, match, timeout: float) -> dict:
        for k, event in enumerate(self.events):
            if match(event):
                return self.events.pop(k)
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if match(message):
                    return message
                self.events.append(message)
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError(f"no answer from the browser within {timeout} s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                self.log.seek(0)
                raise RuntimeError(f"the browser exited: {self.log.read()[-2000:].decode(errors='replace')}")
            self._buffer += chunk

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()  # only the process this helper started
            self.process.wait(timeout=15)
        for fd in (self._to_browser, self._from_browser):
            os.close(fd)
        self.log.close()


def render(page: Path, screenshot: Path, *, binary: str, width: int = 1400, height: int = 1000,
           timeout: float = 60) -> Rendered:
    """Load ``page`` (a local file) in headless Chromium; the images as the browser decoded them, the page's
    text, and a full-page screenshot written to ``screenshot``."""
    profile = tempfile.mkdtemp(prefix="raybench-chromium-")
    browser = _Pipe(binary, width, height, profile)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        browser.send("Page.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                            "deviceScaleFactor": 1, "mobile": False}, session)
        browser.send("Page.navigate", {"url": page.resolve().as_uri()}, session)
        browser.wait(lambda m: m.get("method") == "Page.loadEventFired" and m.get("sessionId") == session, timeout)

        def evaluate(expression: str):
            return browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                                session)["result"]["value"]

        images = evaluate(IMAGES_JS)
        title = evaluate("document.title")
        text = evaluate("document.body.innerText")
        metrics = browser.send("Page.getLayoutMetrics", session=session)
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        page_w, page_h = int(size["width"]), int(size["height"])
        shot = browser.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": page_w, "height": min(page_h, 16000), "scale": 1}}, session,
            timeout=timeout)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        return Rendered(images, title, text, screenshot, (page_w, page_h))
    finally:
        browser.close()
        shutil.rmtree(profile, ignore_errors=True)
