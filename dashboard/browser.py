"""The real dashboard in headless Chromium: serve a store, load the page, wait for it, take a screenshot.

Used by the browser test (tests/test_dashboard.py) and to take the README's screenshot from real stores:

    sh dashboard/install_browser.sh                     # Debian's chromium + chromium-driver, once
    python -m dashboard.browser --db runs/cifar10.db --db smoke.db --out docs/dashboard.png

Several ``--db`` are merged first (``harness merge``, into a temporary store) so one page shows them all.
A minimal W3C WebDriver client over chromedriver's HTTP API (stdlib only): Chromium's one-shot
``--dump-dom --virtual-time-budget`` races Streamlit's websocket (virtual time does not wait for it), so the
page is polled in real time instead.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True, and its children."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def missing_browser() -> str | None:
    """The one-line reason the browser cannot run here, or None."""
    for exe in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.exists(exe) and os.access(exe, os.X_OK)):
            return f"{exe} not found: run `sh dashboard/install_browser.sh` (Debian chromium + chromium-driver)"
    return None


class WebDriver:
    """chromedriver driving one headless Chromium session."""

    def __init__(self, profile: Path, log: Path, window: str = "1400,1000"):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([CHROMEDRIVER, f"--port={self.port}"], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.session = None
        deadline = time.monotonic() + 20
        while True:
            try:
                if self._call("GET", "/status")["value"].get("ready"):
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                stop(self.proc)
                raise RuntimeError(f"chromedriver did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
                f"--window-size={window}", f"--user-data-dir={profile}"]
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}}}
        self.session = self._call("POST", "/session", caps, timeout=60)["value"]["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None, timeout: float = 30) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def get(self, url: str) -> None:
        self._call("POST", f"/session/{self.session}/url", {"url": url}, timeout=60)

    def source(self) -> str:
        return self._call("GET", f"/session/{self.session}/source")["value"]

    def script(self, js: str):
        return self._call("POST", f"/session/{self.session}/execute/sync", {"script": js, "args": []})["value"]

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self._call("GET", f"/session/{self.session}/screenshot", timeout=60)["value"]))

    def close(self) -> None:
        try:
            if self.session:
                self._call("DELETE", f"/session/{self.session}", timeout=20)
        except OSError:
            pass
        finally:
            stop(self.proc)


def wait_for_page(driver: WebDriver, needles: list[str], timeout: float) -> str:
    """Poll the rendered DOM until every needle is in it and Streamlit has finished running."""
    deadline = time.monotonic() + timeout
    dom = ""
    while time.monotonic() < deadline:
        dom = driver.source()
        running = driver.script("return !!document.querySelector('[data-testid=\"stStatusWidget\"]')")
        if all(n in dom for n in needles) and not running:
            return dom
        time.sleep(0.1)
    return dom


def serve_dashboard(db: str | Path, port: int, log: Path) -> subprocess.Popen:
    """Start what `harness dashboard --db DB --port PORT --headless` starts; wait until it answers."""
    env = {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    server = subprocess.Popen(
        [sys.executable, "-m", "dashboard.cli", "dashboard", "--db", str(db), "--port", str(port), "--address", "127.0.0.1", "--headless"],
        cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            stop(server)
            raise RuntimeError(f"dashboard server did not come up: {log.read_text()[-3000:]}")
        time.sleep(0.3)


def screenshot(db: str | Path, out: Path, needles: list[str], work: Path, window: str = "1400,1000", timeout: float = 90) -> str:
    """Serve ``db``, load the page in headless Chromium, wait for ``needles``, write the PNG; return the DOM."""
    port = free_port()
    server = serve_dashboard(db, port, work / "server.log")
    driver = None
    try:
        driver = WebDriver(work / "profile", work / "chromedriver.log", window=window)
        driver.get(f"http://127.0.0.1:{port}/")
        dom = wait_for_page(driver, needles, timeout=timeout)
        missing = [n for n in needles if n not in dom]
        if missing:
            raise RuntimeError(f"the page did not show {missing} within {timeout:.0f} s")
        driver.screenshot(out)
        return dom
    finally:
        if driver is not None:
            driver.close()
        stop(server)
        shutil.rmtree(work / "profile", ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m dashboard.browser`: the screenshot of one store, or of several merged."""
    ap = argparse.ArgumentParser(prog="python -m dashboard.browser", description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", action="append", required=True, help="a store (repeatable: several are merged into a temporary one)")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--expect", action="append", default=[], help="text the page must show before the shot (repeatable)")
    ap.add_argument("--window", default="1400,1000", help="browser window WIDTH,HEIGHT in pixels")
    args = ap.parse_args(argv)
    reason = missing_browser()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="harness-shot-") as tmp:
        work = Path(tmp)
        db: str | Path = args.db[0]
        if len(args.db) > 1:
            from harness.cli import main as harness

            db = work / "merged.db"
            rc = harness(["merge", *args.db, "--into", str(db)])
            if rc:
                print(f"error: harness merge of {args.db} failed (exit {rc})", file=sys.stderr)
                return 2
        needles = ["Adversarial purification leaderboard", *args.expect]
        try:
            screenshot(db, args.out, needles, work, window=args.window)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
