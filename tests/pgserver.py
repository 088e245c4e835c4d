"""A throwaway PostgreSQL server for the tests: ``initdb`` in a temporary folder, ``pg_ctl start`` on a free port.

The server binaries are looked up on PATH, then in Debian's ``/usr/lib/postgresql/*/bin``
(``tests/install_postgres.sh`` installs them where they are missing). PostgreSQL refuses
to run as root: where the tests run as root, the folder is given to the unprivileged
``postgres`` account and every server command runs as that account. The superuser is
``harness`` with a password (TCP logins use scram-sha-256, so a wrong password is refused
as on a real server); each test gets a fresh database of its own (:meth:`PgServer.database`).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

USER = "harness"


def find_binaries() -> Path | None:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres`` (None when this machine has no server)."""
    on_path = shutil.which("pg_ctl")
    candidates = ([Path(on_path).resolve().parent] if on_path else []) + [
        Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
        if Path(p).parent.name.isdigit()
    ]
    for folder in candidates:
        if all((folder / b).is_file() for b in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """One PostgreSQL server in a temporary folder (:meth:`start`, :meth:`stop`)."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.password = secrets.token_hex(8)
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="harness-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self._as: dict = {}
        if os.geteuid() == 0:  # postgres will not run as root: hand the folder to the postgres account
            pw = pwd.getpwnam("postgres")
            os.chown(self.folder, pw.pw_uid, pw.pw_gid)
            self.folder.chmod(0o700)

            def demote(uid=pw.pw_uid, gid=pw.pw_gid):
                os.setgid(gid)
                os.setuid(uid)

            self._as = {"preexec_fn": demote, "cwd": str(self.folder)}
        self._databases = 0

    def _run(self, *args: str, timeout: float = 120) -> None:
        proc = subprocess.run([str(self.bindir / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "LC_ALL": "C"}, **self._as)
        if proc.returncode:
            log = self.log.read_text()[-2000:] if self.log.is_file() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr[-2000:]}\n{log}")

    def start(self) -> PgServer:
        """``initdb`` (no fsync: a throwaway server), then start it on 127.0.0.1 and wait until it accepts logins."""
        pwfile = self.folder / "pw"
        pwfile.write_text(self.password + "\n")
        if self._as:
            os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
        self._run("initdb", "-D", str(self.data), "-U", USER, f"--pwfile={pwfile}", "--auth-local=trust",
                  "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync", "--no-instructions")
        opts = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "120", "start", timeout=180)
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its folder."""
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop", timeout=90)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database: str = "postgres", password: str | None = None) -> str:
        """The SQLAlchemy URL of ``database`` (psycopg 3), with the right password unless one is given."""
        return f"postgresql+psycopg://{USER}:{password or self.password}@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        self._databases += 1
        name = f"t{os.getpid()}_{self._databases}_{int(time.time() * 1000) % 100000}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, password=self.password, dbname="postgres",
                             autocommit=True, connect_timeout=30) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)
