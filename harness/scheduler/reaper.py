"""Ending the private Ray cluster of a grid driver that died without stopping it (Linux).

``ray.init()`` without an address starts a private cluster (GCS, raylet, agents, task
workers) whose processes descend from the driver, and ``ray.shutdown()`` stops them. A
driver killed with SIGKILL (or by the out-of-memory killer) runs no shutdown: the GCS and
the raylet die with it, but Ray 2.60 leaves its agents (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``) running for minutes, and a task worker computes on (holding its
GPU) until its next call into Ray.

:class:`Reaper` starts this file as a watchdog process (its own session, the standard
library only) and tells it the pid and start time of every process the driver's Ray
started. When the watchdog's stdin closes, because the driver finished or died, it ends
those that are still alive: SIGTERM, then SIGKILL after a grace period. A process is
matched by pid and start time, so a pid the system has since given to another process is
never touched. Where ``/proc`` is missing (not Linux) the reaper does nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

#: Seconds the watchdog waits after SIGTERM before SIGKILL.
GRACE_S = 2.0


def start_time(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot, from /proc), or None if it has ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])  # a zombie has ended; only its parent's wait is missing


def descendants(root: int) -> dict[int, int]:
    """Pid -> start time of every living descendant of ``root`` ({} without /proc)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    try:
        entries = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return {}
    for name in entries:
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        pid = int(name)
        children.setdefault(int(fields[1]), []).append(pid)
        starts[pid] = int(fields[19])
    out: dict[int, int] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid not in out:
            out[pid] = starts[pid]
            todo += children.get(pid, [])
    return out


class Reaper:
    """The driver's side: start the watchdog, keep it told of the processes Ray started, close it.

    :meth:`track` is cheap (one pass over /proc) and rate-limited to once per ``every_s``.
    """

    def __init__(self, every_s: float = 1.0):
        self.every_s, self._last, self._sent = every_s, 0.0, set()
        self.proc: subprocess.Popen | None = None
        if Path("/proc/self/stat").is_file():
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve())], stdin=subprocess.PIPE, text=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )

    def track(self, force: bool = False) -> None:
        """Send the watchdog the driver's descendants it has not been told of yet."""
        if self.proc is None or (not force and time.monotonic() - self._last < self.every_s):
            return
        self._last = time.monotonic()
        new = [(pid, t) for pid, t in descendants(os.getpid()).items() if pid != self.proc.pid and (pid, t) not in self._sent]
        if not new:
            return
        try:
            self.proc.stdin.write(json.dumps(new) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):  # the watchdog is gone: nothing more to do
            self.proc = None
            return
        self._sent.update(new)

    def close(self, timeout: float = 15.0) -> None:
        """After ``ray.shutdown()``: let the watchdog end whatever outlived it, and wait for it."""
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass  # it finishes on its own: it runs in its own session


def _end(procs: dict[int, int]) -> None:
    alive = {pid for pid, t in procs.items() if start_time(pid) == t}
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 0.0)):
        for pid in sorted(alive):
            if start_time(pid) == procs[pid]:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = {pid for pid in alive if start_time(pid) == procs[pid]}


def main() -> None:
    """The watchdog: read ``[[pid, start time], ...]`` lines until stdin closes, then end those processes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver's Ctrl-C is the driver's to handle
    procs: dict[int, int] = {}
    for line in sys.stdin:
        for pid, t in json.loads(line):
            procs[int(pid)] = int(t)
    _end(procs)


if __name__ == "__main__":
    main()
