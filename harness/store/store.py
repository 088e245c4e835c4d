"""The results store: read and write jobs in SQLite (``results.db``) or any SQLAlchemy URL.

The tables are in :mod:`harness.store.schema`. Nothing is ever deleted implicitly:
``--force`` reruns a job by replacing its rows in one transaction, only after the new
run has finished (:meth:`Store.replace_job`), so an interrupted forced rerun loses
nothing.
"""

from __future__ import annotations

import functools
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import numpy as np
from sqlalchemy import bindparam, create_engine, delete, event, insert, inspect, select, text, update
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, OperationalError, ProgrammingError, SQLAlchemyError
from sqlalchemy.orm import Session, defer, sessionmaker
from sqlalchemy.orm.attributes import set_committed_value

from harness.core.registry import HarnessError
from harness.store.codec import decode_images, encode_images, pack_adv, unpack_adv
from harness.store.migrate import ADDED_COLUMNS, add_missing_columns
from harness.store.schema import (
    SCHEMA_VERSION,
    AdvCacheRow,
    BatchRow,
    Base,
    CurveRow,
    ExampleRow,
    Job,
    MetaRow,
    MetricRow,
    SampleRow,
)

DEFAULT_DB = "results.db"
#: The transaction-level advisory lock every write transaction on PostgreSQL takes first (the server's
#: counterpart of SQLite's ``BEGIN IMMEDIATE``): any number of first writers create the schema once, and
#: a check-then-insert (a job, a batch, an adversarial-cache entry) is atomic across processes and machines.
WRITE_LOCK = 0x68617273  # "hars"
#: Seconds a server connection attempt waits before it is a one-line error (a server that is down or unreachable).
CONNECT_TIMEOUT_S = 10


def resolve_url(db: str | None) -> str:
    """``--db`` / ``HARNESS_DB`` / ``results.db``: a path becomes ``sqlite:///path``."""
    db = db or os.environ.get("HARNESS_DB") or DEFAULT_DB
    if "://" in db:
        return db
    return f"sqlite:///{Path(db).expanduser()}"


def sqlite_file(url: str) -> Path | None:
    """The database file behind a SQLite URL (None for in-memory and other databases)."""
    if not url.startswith("sqlite"):
        return None
    rest = url.split("://", 1)[1] if "://" in url else ""
    if not rest.startswith("/"):
        return None  # sqlite:// (memory)
    path = rest[1:].partition("?")[0]
    if path.startswith("file:"):
        path = unquote(path[5:])
    if path in ("", ":memory:"):
        return None
    return Path(path).expanduser()


def readonly_url(db: str | None) -> str:
    """``--db`` (path or URL) -> a URL SQLite opens read-only (``mode=ro``: it never creates the file).

    Server URLs are passed through: their readers open read-only sessions instead
    (:func:`server_engine_args`).
    """
    url = resolve_url(db)
    path = sqlite_file(url)
    if path is None:
        return url
    # on a read-only file system SQLite cannot create the WAL index a reader needs; nothing
    # can write there either, so the file is opened as immutable
    mode = "mode=ro&immutable=1" if _read_only_fs(path) else "mode=ro"
    return f"sqlite:///file:{quote(str(path.resolve()))}?{mode}&uri=true"


def display_url(db: str | None) -> str:
    """``--db`` as it may be printed: a path as given, a URL without its password (``***``)."""
    db = db or os.environ.get("HARNESS_DB") or DEFAULT_DB
    if "://" not in db:
        return db
    try:
        return make_url(db).render_as_string(hide_password=True)
    except ArgumentError:
        return db.split("://", 1)[0] + "://..."


def is_server(url: str) -> bool:
    """Whether ``url`` names a database server (PostgreSQL) rather than a SQLite file or memory."""
    return not url.startswith("sqlite")


def server_engine_args(url: str, read_only: bool) -> dict[str, Any]:
    """``create_engine`` arguments for a server URL: a connect timeout, UTC timestamps and, for readers, a
    server-enforced read-only session (``default_transaction_read_only``: every transaction of the
    connection is read-only, whatever a query tries). Other servers than PostgreSQL get none.
    """
    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError:
        return {}
    if backend != "postgresql":
        return {}
    options = "-c timezone=UTC" + (" -c default_transaction_read_only=on" if read_only else "")
    return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S, "options": options,
                             "application_name": "purification-harness"},
            "pool_pre_ping": True}


def store_missing(db: str | None) -> bool:
    """Whether ``db`` names a SQLite file that does not exist (yet)."""
    path = sqlite_file(resolve_url(db))
    return path is not None and not path.exists()


def open_existing(db: str | None) -> Store | None:
    """The store ``db`` opened read-only, or None when it holds no store yet: no SQLite file, or a server
    database without the tables (planning against it then plans against an empty store; nothing is created).
    """
    if store_missing(db):
        return None
    try:
        return Store(db, read_only=True)
    except HarnessError as exc:
        if not is_server(resolve_url(db)) or "holds no results" not in str(exc):
            raise
        return None


def _read_only_fs(path: Path) -> bool:
    """Whether ``path`` (or its folder) lies on a file system mounted read-only."""
    try:
        return bool(os.statvfs(path if path.exists() else path.parent).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows)
        return False


def utcnow() -> datetime:
    """Timezone-aware now (UTC)."""
    return datetime.now(timezone.utc)


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _conn(s: Session | Connection) -> Connection:
    """The connection a write runs on (a session's, or the connection itself)."""
    return s.connection() if isinstance(s, Session) else s


def _bulk_insert(s: Session | Connection, model: type, rows: list[dict[str, Any]]) -> None:
    """``INSERT`` ``rows`` into ``model``'s table with one executemany per distinct key set (in order)."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row), []).append(row)
    unknown = {k for keys in groups for k in keys} - set(model.__table__.columns.keys())
    if unknown:
        raise TypeError(f"{model.__name__}: unknown column(s) {sorted(unknown)}")
    conn = _conn(s)  # Core executemany on the connection: no ORM bulk-insert machinery
    for group in groups.values():
        conn.execute(insert(model.__table__), group)


def _reads(fn):
    """A read method whose database errors become one-line HarnessErrors."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except SQLAlchemyError as exc:
            raise self._error(exc) from exc

    return wrapper


class Store:
    """Read and write jobs. Safe for several writer processes on one SQLite file (WAL) or one PostgreSQL database.

    On SQLite every write transaction starts with ``BEGIN IMMEDIATE``: it takes the
    file's write lock before its first read, so a check-then-insert (a batch already
    written? an adversarial-cache entry already there? the schema already created?) is
    atomic across processes; other processes wait for the lock (60 s) instead of
    failing. Reads run in ordinary (deferred) transactions and never block writers.
    Creating the schema is one such transaction, so any number of processes may open a
    store that does not exist yet at the same time. On PostgreSQL every write transaction
    takes one advisory lock first (:data:`WRITE_LOCK`), to the same effect.

    ``read_only=True`` never creates or writes anything: a SQLite file is opened with
    ``mode=ro``, a server connection with read-only transactions, and a missing file, or
    one that holds no results store, is a one-line error.
    """

    def __init__(self, url: str | None = None, *, read_only: bool = False):
        self.url = resolve_url(url)
        self.read_only = read_only
        self._path = sqlite_file(self.url)
        if self._path is not None:
            self._check_path(self._path)
        self.engine = self._engine(readonly_url(self.url) if read_only else self.url)
        # write transactions: BEGIN IMMEDIATE on SQLite (see _begin)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_engine = self.engine.execution_options(harness_write=True)
        self._write_sessions = sessionmaker(self._write_engine, expire_on_commit=False)
        self._missing: dict[type, list[str]] = {}  # columns a read-only older store lacks (read as None)
        if read_only:
            self._check_schema()
        else:
            self._create_schema()

    def close(self) -> None:
        """Close the store's connections (SQLite then folds its write-ahead log into the file)."""
        self.engine.dispose()

    # ------------------------------------------------------------------ opening
    def _where(self) -> str:
        if self._path is not None:
            return str(self._path)
        try:
            return make_url(self.url).render_as_string(hide_password=True)
        except ArgumentError:
            return "'" + self.url + "'"

    @property
    def shown_url(self) -> str:
        """The store's URL as it may be printed (without a password)."""
        return display_url(self.url)

    def _error(self, exc: BaseException) -> HarnessError:
        """One line naming the store (a URL without its password) and what went wrong."""
        msg = _first_line(exc)
        low = msg.lower()
        if self._path is None and isinstance(exc, OperationalError) and ("connection" in low or "authentication" in low):
            return HarnessError(f"results store {self._where()}: cannot connect to the database server: {msg}")
        if "readonly" in low or "read-only" in low:
            return HarnessError(f"results store {self._where()} cannot be written (a read-only file or folder?): {msg}")
        if "not a database" in low:
            return HarnessError(f"results store {self._where()} is not a SQLite database ({msg})")
        return HarnessError(f"results store {self._where()}: {type(exc).__name__}: {msg}")

    def _check_path(self, path: Path) -> None:
        if path.is_dir():
            raise HarnessError(f"results store {path} is a folder; give a file, e.g. {path / DEFAULT_DB}")
        if self.read_only:
            if not path.exists():
                raise HarnessError(f"results store {path} does not exist")
            return
        folder = path.parent
        if not folder.is_dir():
            raise HarnessError(f"results store folder {folder} does not exist")
        # SQLite writes the file and, beside it, its write-ahead log
        if _read_only_fs(folder) or not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise HarnessError(f"results store {path} cannot be written: the file or its folder is read-only")

    def _engine(self, url: str) -> Engine:
        try:
            make_url(url)
            kw = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else server_engine_args(url, self.read_only)
            engine = create_engine(url, **kw)
        except NoSuchModuleError:  # (an ArgumentError)
            raise HarnessError(f"--db {self._where()}: unknown database kind '{self.url.split(':', 1)[0]}'") from None
        except ArgumentError as exc:
            msg = f"--db {self.url!r} is neither a file path nor a valid database URL ({_first_line(exc)})"
            raise HarnessError(msg) from None
        except ImportError as exc:
            msg = f"--db {self._where()} needs a database driver that is not installed ({_first_line(exc)})"
            raise HarnessError(msg) from None
        if url.startswith("sqlite"):
            read_only = self.read_only

            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_conn, _record):
                dbapi_conn.isolation_level = None  # transactions are begun by _begin, not by the driver
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA busy_timeout=60000")
                if read_only:
                    cur.execute("PRAGMA query_only=ON")
                else:
                    cur.execute("PRAGMA journal_mode=WAL")  # readers run while a writer writes
                    # a commit reaches the OS at once (a killed process loses nothing committed) and the disk at the
                    # next checkpoint: a power cut may lose the last batches (rerun resumes), never corrupt the file
                    cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()

            @event.listens_for(engine, "begin")
            def _begin(conn):
                conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("harness_write") else "BEGIN")

        return engine

    def _create_schema(self) -> None:
        """Create the tables and the schema-version row if missing (idempotent, one transaction)."""

        def fn(s: Session) -> None:
            Base.metadata.create_all(s.connection())  # checks and creates under the write lock
            add_missing_columns(s.connection())  # columns added since older stores were written
            row = s.get(MetaRow, "schema_version")
            if row is None:
                s.add(MetaRow(key="schema_version", value=str(SCHEMA_VERSION)))
            else:
                self._check_version(row.value)

        # under the write lock on SQLite and PostgreSQL; another server database may still race
        # (two processes creating one table): the loser's retry then finds it
        self._write(fn, retry_on=(IntegrityError, ProgrammingError))

    def _check_version(self, value: str) -> None:
        if value != str(SCHEMA_VERSION):
            raise HarnessError(
                f"results store {self._where()} has schema version {value}; this harness reads and writes {SCHEMA_VERSION}"
            )

    @_reads
    def _check_schema(self) -> None:
        with self.engine.connect() as conn:
            tables = inspect(conn)
            if not tables.has_table("jobs"):
                raise HarnessError(f"results store {self._where()} holds no results (no 'jobs' table)")
            if tables.has_table("meta"):
                value = conn.execute(select(MetaRow.value).where(MetaRow.key == "schema_version")).scalar()
                if value is not None:
                    self._check_version(value)
            models = {m.__tablename__: m for m in (Job, ExampleRow)}
            for table, column in ADDED_COLUMNS:
                if table in models and tables.has_table(table) and column not in {c["name"] for c in tables.get_columns(table)}:
                    self._missing.setdefault(models[table], []).append(column)

    def _select(self, model):
        """``select(model)`` that skips the columns an older read-only store lacks (see :meth:`_filled`)."""
        q = select(model)
        missing = self._missing.get(model)
        return q.options(*(defer(getattr(model, c)) for c in missing)) if missing else q

    def _filled(self, rows):
        """Rows of :meth:`_select` with the columns their store lacks set to None (as after a migration)."""
        for r in rows:
            for c in self._missing.get(type(r), ()):
                set_committed_value(r, c, None)
        return rows

    # ------------------------------------------------------------------ plumbing
    @staticmethod
    def _retry(fn, attempts: int = 8, retry_on: tuple[type[Exception], ...] = ()):
        """Retry on SQLite 'database is locked' with backoff, and at most twice on ``retry_on``."""
        conflicts = 0
        for i in range(attempts):
            try:
                return fn()
            except retry_on:
                conflicts += 1
                if conflicts > 2 or i == attempts - 1:
                    raise
            except OperationalError as exc:
                low = str(exc).lower()
                if not any(w in low for w in ("locked", "busy", "deadlock", "could not serialize")) or i == attempts - 1:
                    raise
            time.sleep(0.05 * 2**i)

    def session(self) -> Session:
        """A session for reading (writes go through the store's methods)."""
        return self._sessions()

    def _write(self, fn, retry_on: tuple[type[Exception], ...] = (IntegrityError,), *, core: bool = False):
        """Run ``fn(session)`` in one write transaction; database errors become one-line HarnessErrors.

        An IntegrityError is retried (twice at most): on a server database two transactions
        can both find a row absent and both insert it, and the retry then finds the other's
        row (every write here checks before it inserts). On SQLite the write lock rules that out.
        """
        if self.read_only:
            raise HarnessError(f"results store {self._where()} was opened read-only")

        server = self.engine.dialect.name == "postgresql"

        def tx():
            # core: fn gets a Connection, not a Session (the grid's per-job writes, which use Core statements only)
            with (self._write_engine.begin() if core else self._write_sessions.begin()) as s:
                if server:  # writers one at a time, as SQLite's write lock (see WRITE_LOCK)
                    s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": WRITE_LOCK})
                return fn(s)

        try:
            return self._retry(tx, retry_on=retry_on)
        except SQLAlchemyError as exc:
            raise self._error(exc) from exc

    # ------------------------------------------------------------------ jobs
    @_reads
    def get_job(self, job_id: str) -> Job | None:
        with self.session() as s:
            if self._missing:
                return next(iter(self._filled(list(s.scalars(self._select(Job).where(Job.id == job_id))))), None)
            return s.get(Job, job_id)

    @_reads
    def job_status(self, job_id: str) -> str | None:
        """The job's status (running, done, failed, skipped), or None where it is not stored: one column read."""
        with self.session() as s:
            return s.scalar(select(Job.status).where(Job.id == job_id))

    def begin_job(self, job_id: str, **fields: Any) -> Job:
        """Create the job row (status running) or return the existing one for resuming."""
        self.start_job(job_id, **fields)
        return self.get_job(job_id)

    def start_job(self, job_id: str, **fields: Any) -> set[int]:
        """Create the job row (status running; a failed, skipped or running one is marked running again with
        ``fields``) and return its stored batches (to skip on resuming), in one write transaction.
        """
        # Core statements on the connection (no ORM load of the row): once per job of a grid
        jobs, batches = Job.__table__, BatchRow.__table__

        def fn(c: Connection) -> set[int]:
            status = c.execute(select(jobs.c.status).where(jobs.c.id == job_id)).scalar()
            if status is None:  # a new job has no batches
                c.execute(insert(jobs), {"id": job_id, "status": "running", "created_at": utcnow(), **fields})
                return set()
            if status in ("failed", "skipped", "running"):
                c.execute(update(jobs).where(jobs.c.id == bindparam("job_key")),
                          {"job_key": job_id, "status": "running", "reason": None, **fields})
            return set(c.execute(select(batches.c.batch).where(batches.c.job_id == job_id)).scalars())

        return self._write(fn, core=True)

    def record_skip(self, job_id: str, reason: str, **fields: Any) -> None:
        def fn(s: Session):
            job = s.get(Job, job_id)
            if job is None:
                s.add(Job(id=job_id, status="skipped", reason=reason, created_at=utcnow(), **fields))
            elif job.status != "done":
                job.status, job.reason = "skipped", reason

        self._write(fn)

    def fail_job(self, job_id: str, reason: str) -> None:
        def fn(s: Session):
            job = s.get(Job, job_id)
            if job is not None and job.status != "done":
                job.status, job.reason, job.finished_at = "failed", reason[:2000], utcnow()

        self._write(fn)

    @_reads
    def done_batches(self, job_id: str) -> set[int]:
        with self.session() as s:
            return set(s.scalars(select(BatchRow.batch).where(BatchRow.job_id == job_id)))

    def write_batch(self, job_id: str, batch: int, **payload: Any) -> None:
        """Write one finished batch atomically: a rerun either sees all of it or none.

        ``payload``: ``examples`` (list of ExampleRow field dicts), ``curves`` (attack ->
        robust counts per iteration), ``nfe``, ``seconds``, optional ``samples`` and ``extra``.
        """
        self._write(lambda c: self._add_batch(c, job_id, batch, **payload), core=True)

    @staticmethod
    def _add_batch(
        c: Connection,
        job_id: str,
        batch: int,
        *,
        examples: list[dict],
        curves: dict[str, list[int]],
        nfe: dict[str, int],
        seconds: float,
        samples: list[dict] | None = None,
        extra: dict | None = None,
        adv_cache: tuple[str, dict] | None = None,
    ) -> None:
        # insert-or-ignore under the write lock: an entry another process stored first stays, and is
        # what every later lookup reads (entries under one key hold the same examples)
        # Core statements throughout (no ORM object, no flush): a grid writes one such transaction per batch
        cache, rows = AdvCacheRow.__table__, BatchRow.__table__
        if adv_cache is not None and c.execute(select(cache.c.key).where(cache.c.key == adv_cache[0])).first() is None:
            c.execute(insert(cache), {"key": adv_cache[0], "payload": pack_adv(adv_cache[1]), "created_at": utcnow()})
        if c.execute(select(rows.c.id).where(rows.c.job_id == job_id, rows.c.batch == batch)).first() is not None:
            return  # already written by an earlier (interrupted) run
        _bulk_insert(c, BatchRow, [{"job_id": job_id, "batch": batch, "n": len(examples), "curves": curves, "nfe": nfe,
                                    "seconds": seconds, "extra": extra or {}}])
        # per-example rows as Core executemany inserts (no ORM object per row). Rows are grouped by
        # the keys they give, so a column a row leaves out is SQL NULL, as with an ORM object that
        # never set it (a JSON column given None would store JSON 'null' instead).
        _bulk_insert(c, ExampleRow, [{"job_id": job_id, "batch": batch, **e} for e in examples])
        _bulk_insert(c, SampleRow, [
            {"job_id": job_id, "position": smp["position"], "images": encode_images(**smp["images"])} for smp in samples or []
        ])

    @_reads
    def get_adv(self, key: str) -> dict | None:
        """Cached adversarial examples for ``key`` (see harness.evaluation.batch.adv_cache_key), or None."""
        with self.session() as s:
            row = s.get(AdvCacheRow, key)
            return None if row is None else unpack_adv(row.payload)

    def replace_job(self, job_id: str, batches: list[dict], **finish: Any) -> None:
        """``--force``: swap a job's stored rows for a fresh run's in one transaction.

        The old rows stay until the new run has completely finished, so an interrupted
        forced rerun loses nothing.
        """

        def fn(c: Connection):
            for model in (ExampleRow, BatchRow, MetricRow, CurveRow, SampleRow):
                table = model.__table__
                c.execute(delete(table).where(table.c.job_id == job_id))
            for b in batches:
                self._add_batch(c, job_id, **b)
            self._finish(c, job_id, **finish)

        self._write(fn, core=True)

    @_reads
    def batch_rows(self, job_id: str) -> list[BatchRow]:
        with self.session() as s:
            return list(s.scalars(select(BatchRow).where(BatchRow.job_id == job_id).order_by(BatchRow.batch)))

    @_reads
    def example_rows(self, job_id: str) -> list[ExampleRow]:
        with self.session() as s:
            q = self._select(ExampleRow).where(ExampleRow.job_id == job_id).order_by(ExampleRow.position)
            return self._filled(list(s.scalars(q)))

    def complete_job(self, job_id: str, batch: dict | None, compute) -> None:
        """In one write transaction: store ``batch`` (the job's last, if given: ``batch=`` index and the
        :meth:`write_batch` payload), read every example and batch row of the job, and store
        ``compute(examples, batches)`` (the :meth:`finish_job` keywords) marking it done.

        What a grid does once per job: the job is done with all its rows, or nothing of it changes.
        ``compute`` may raise (a HarnessError): then nothing is written. The rows it gets are Core
        rows (attribute access by column name, as the ORM objects of :meth:`example_rows`).
        """
        ex, bt = ExampleRow.__table__, BatchRow.__table__

        def fn(c: Connection) -> None:
            if batch is not None:
                self._add_batch(c, job_id, **batch)
            examples = list(c.execute(select(ex).where(ex.c.job_id == job_id).order_by(ex.c.position)))
            batches = list(c.execute(select(bt).where(bt.c.job_id == job_id).order_by(bt.c.batch)))
            self._finish(c, job_id, **compute(examples, batches))

        self._write(fn, core=True)

    def finish_job(self, job_id: str, **finish: Any) -> None:
        """Store aggregate metrics and curves, and mark the job done (one transaction)."""
        self._write(lambda c: self._finish(c, job_id, **finish), core=True)

    @staticmethod
    def _finish(
        c: Connection,
        job_id: str,
        *,
        metrics: dict[str, tuple[float, float | None, float | None, int | None]],
        curves: dict[str, list[tuple[float, int]]],
        timings: dict,
        nfe: dict,
        environment: dict,
        fields: dict | None = None,
    ) -> None:
        # one cached Core UPDATE whose SET columns are its parameters' keys (not an ORM load of the row and its
        # JSON columns, nor values() that the statement cache would key on): it runs once per job of a grid
        values = {**(fields or {}), "status": "done", "reason": None, "timings": timings, "nfe": nfe,
                  "environment": environment, "finished_at": utcnow()}
        jobs = Job.__table__
        if c.execute(update(jobs).where(jobs.c.id == bindparam("job_key")), {"job_key": job_id, **values}).rowcount == 0:
            raise HarnessError(f"job {job_id} vanished from the store")
        for model in (MetricRow, CurveRow):
            table = model.__table__
            c.execute(delete(table).where(table.c.job_id == job_id))
        _bulk_insert(c, MetricRow, [
            {"job_id": job_id, "name": name, "value": float(value), "lower": lo, "upper": hi, "n": n}
            for name, (value, lo, hi, n) in metrics.items()
        ])
        _bulk_insert(c, CurveRow, [
            {"job_id": job_id, "attack": attack, "iteration": it, "accuracy": float(acc), "n": int(n)}
            for attack, points in curves.items() for it, (acc, n) in enumerate(points)
        ])

    @_reads
    def metrics(self, job_id: str) -> dict[str, MetricRow]:
        with self.session() as s:
            return {m.name: m for m in s.scalars(select(MetricRow).where(MetricRow.job_id == job_id))}

    @_reads
    def curves(self, job_id: str) -> dict[str, list[float]]:
        with self.session() as s:
            rows = s.scalars(select(CurveRow).where(CurveRow.job_id == job_id).order_by(CurveRow.attack, CurveRow.iteration))
            out: dict[str, list[float]] = {}
            for r in rows:
                out.setdefault(r.attack, []).append(r.accuracy)
            return out

    @_reads
    def samples(self, job_id: str) -> list[tuple[int, dict[str, np.ndarray]]]:
        with self.session() as s:
            rows = s.scalars(select(SampleRow).where(SampleRow.job_id == job_id).order_by(SampleRow.position))
            return [(r.position, decode_images(r.images)) for r in rows]

    @_reads
    def find_jobs(self, prefix: str) -> list[Job]:
        """The jobs whose id starts with ``prefix``."""
        with self.session() as s:
            return self._filled(list(s.scalars(self._select(Job).where(Job.id.startswith(prefix, autoescape=True)))))

    @_reads
    def jobs(self, status: str | None = None) -> list[Job]:
        with self.session() as s:
            q = self._select(Job).order_by(Job.created_at)
            if status:
                q = q.where(Job.status == status)
            return self._filled(list(s.scalars(q)))

    @_reads
    def job_ids(self, status: str | None = None) -> set[str]:
        """The ids of every job (of ``status``), in one query."""
        with self.session() as s:
            q = select(Job.id) if status is None else select(Job.id).where(Job.status == status)
            return set(s.scalars(q))

    @_reads
    def results_table(self, status: str | None = "done") -> list[dict[str, Any]]:
        """One flat dict per job with its headline metrics (for ``harness results``)."""
        out = []
        with self.session() as s:
            q = self._select(Job).order_by(Job.created_at)
            if status:
                q = q.where(Job.status == status)
            jobs = self._filled(list(s.scalars(q)))
            metrics: dict[str, dict[str, MetricRow]] = {}
            for m in s.scalars(select(MetricRow)):
                metrics.setdefault(m.job_id, {})[m.name] = m
        for j in jobs:
            ms = metrics.get(j.id, {})

            def val(name):
                m = ms.get(name)
                return None if m is None else m.value

            row = {
                "job_id": j.id[:12],
                "status": j.status,
                "defense": j.defense,
                "threat": j.threat,
                "dataset": j.dataset,
                "classifier": j.classifier,
                "norm": j.norm,
                "eps": j.eps,
                "n": j.n_examples,
                "seed": j.seed,
                "data_seed": (j.config or {}).get("data_seed"),
                "path": j.gradient_path,
                "eot": j.eot_samples,
                "draws": j.eval_draws,
                "clean": val("clean_accuracy"),
                "robust": val("robust_accuracy"),
                "robust_lo": ms["robust_accuracy"].lower if "robust_accuracy" in ms else None,
                "robust_hi": ms["robust_accuracy"].upper if "robust_accuracy" in ms else None,
                "robust_single": val("robust_accuracy_single"),
                "robust_majority": val("robust_accuracy_majority"),
                "robust_worst": val("robust_accuracy_worst"),
                "seconds": (j.timings or {}).get("total_s"),
                "flags": j.flags,  # list of {"flag", "detail"} (harness.evaluation.flags); None: stored before flags
            }
            for extra in ("psnr_clean", "ssim_clean", "psnr_adv", "ssim_adv", "detection_auc"):
                if extra in ms:
                    row[extra] = ms[extra].value
            if j.reason:
                row["reason"] = j.reason
            out.append(row)
        self._add_seed_spread(out, jobs)
        return out

    @staticmethod
    def _add_seed_spread(rows: list[dict[str, Any]], jobs: list[Job]) -> None:
        """Each finished row's ``seeds_mean``, ``seeds_sd``, ``seeds_n``: robust accuracy over the seeds of its setting."""
        import pandas as pd

        from harness.evaluation.stats import over_seeds, setting_key
        from harness.store.check import shift_label, trained_on

        if not rows:
            return
        frame = pd.DataFrame([{
            "status": r["status"], "robust": r["robust"], "defense": j.defense, "classifier": j.classifier,
            "dataset": j.dataset, "threat": j.threat, "norm": j.norm, "eps": j.eps, "n_examples": j.n_examples,
            "shift": shift_label(j.config), "trained_on": trained_on(j.config),
            "setting": setting_key((j.config or {}).get("defense_config"), (j.config or {}).get("threat_spec")),
        } for r, j in zip(rows, jobs, strict=True)])
        spread = over_seeds(frame)  # indexed by row number
        for k, r in enumerate(rows):
            got = spread.loc[k] if k in spread.index else None
            r["seeds_mean"] = None if got is None else float(got["seeds_mean"])
            r["seeds_sd"] = None if got is None or pd.isna(got["seeds_sd"]) else float(got["seeds_sd"])
            r["seeds_n"] = None if got is None else int(got["seeds_n"])
