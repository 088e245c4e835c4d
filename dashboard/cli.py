"""``harness dashboard``: serve the leaderboard page (read-only) with Streamlit.

Wired into ``harness.cli.build_parser`` by :func:`add_dashboard_parser`; also runnable as
``python -m dashboard.cli dashboard --db results.db`` (what the browser test starts).
The store reaches the page both as ``-- --db URL`` and as ``$HARNESS_DASHBOARD_DB``;
the page opens it read-only and never creates it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from harness.core.registry import HarnessError

APP = Path(__file__).resolve().with_name("app.py")
DB_ENV = "HARNESS_DASHBOARD_DB"
DEFAULT_PORT = 8501


def add_dashboard_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``dashboard`` subcommand to an argparse subparsers object."""
    d = subparsers.add_parser(
        "dashboard",
        help="serve the leaderboard page (Streamlit, read-only)",
        description="Serve the leaderboard over a results store with Streamlit. The store is opened read-only.",
    )
    d.add_argument("--db", default=None, help="results store: path or SQLAlchemy URL (default $HARNESS_DB or results.db)")
    d.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to serve on (default {DEFAULT_PORT})")
    d.add_argument("--address", default=None,
                   help="address to bind (default: Streamlit's, every interface; 127.0.0.1 keeps it to this machine)")
    d.add_argument("--headless", action=argparse.BooleanOptionalAction, default=None,
                   help="do not open a browser (default: headless when there is no display)")
    d.set_defaults(func=cmd_dashboard)
    return d


def resolve_db(db: str | None) -> str:
    """The store as the page will get it: URLs unchanged, paths made absolute."""
    db = db or os.environ.get("HARNESS_DB") or "results.db"
    if "://" in db:
        return db
    return str(Path(db).expanduser().resolve())


def default_headless() -> bool:
    """Whether to serve without opening a browser: never on macOS or Windows, elsewhere when neither DISPLAY
    nor WAYLAND_DISPLAY is set.
    """
    if sys.platform in ("darwin", "win32"):
        return False
    return not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def streamlit_command(db: str, port: int = DEFAULT_PORT, headless: bool = True, address: str | None = None) -> list[str]:
    """The ``streamlit run`` command line that serves the page on ``db``."""
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.port", str(port),
        "--server.headless", "true" if headless else "false",
        "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none",
        "--server.runOnSave", "false",
        "--client.toolbarMode", "minimal",
    ]
    if address:
        cmd += ["--server.address", address]
    return cmd + ["--", "--db", db]


def cmd_dashboard(args) -> int:
    """Serve the dashboard on ``args.db`` with streamlit until it exits or is interrupted; returns its exit status."""
    if not 0 < args.port < 65536:
        raise HarnessError(f"--port {args.port} is out of range (1-65535)")
    if importlib.util.find_spec("streamlit") is None:
        raise HarnessError("streamlit is not installed: pip install 'streamlit>=1.40'")
    db = resolve_db(args.db)
    headless = default_headless() if args.headless is None else args.headless
    from dashboard.queries import display_url, store_missing

    where = f"http://{args.address or 'localhost'}:{args.port}"
    print(f"serving the leaderboard of {display_url(db)} (read-only) at {where}; Ctrl-C stops it", file=sys.stderr)
    if store_missing(db):
        print(f"note: {db} does not exist yet; the page shows how to produce results", file=sys.stderr)
    env = {**os.environ, DB_ENV: db, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    proc = subprocess.Popen(streamlit_command(db, args.port, headless, args.address), env=env)

    def _forward(signum, _frame):
        proc.send_signal(signum)

    old = signal.signal(signal.SIGTERM, _forward)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the server got the same Ctrl-C; let it shut down
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        return 0
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``harness dashboard`` on its own (``argv`` or sys.argv); returns the exit status, 2 on a HarnessError."""
    parser = argparse.ArgumentParser(prog="harness")
    add_dashboard_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
