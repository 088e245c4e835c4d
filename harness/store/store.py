"""The results store: read and write jobs in SQLite (``results.db``) or any SQLAlchemy URL.

The tables are in :mod:`harness.store.schema`. Nothing is ever deleted implicitly:
``--force`` reruns a job by replacing its rows in one transaction, only after the new
run has finished (:meth:`Store.replace_job`), so an interrupted forced rerun loses
nothing.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import create_engine, delete, event, select
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from harness.core.registry import HarnessError
from harness.store.codec import decode_images, encode_images, pack_adv, unpack_adv
from harness.store.migrate import add_missing_columns
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


def resolve_url(db: str | None) -> str:
    """``--db`` / ``HARNESS_DB`` / ``results.db``: a path becomes ``sqlite:///path``."""
    db = db or os.environ.get("HARNESS_DB") or DEFAULT_DB
    if "://" in db:
        return db
    return f"sqlite:///{Path(db).expanduser()}"


def utcnow() -> datetime:
    """Timezone-aware now (UTC)."""
    return datetime.now(timezone.utc)


class Store:
    """Read and write jobs. Safe for several writer processes on one SQLite file (WAL)."""

    def __init__(self, url: str | None = None, *, read_only: bool = False):
        self.url = resolve_url(url)
        kwargs: dict[str, Any] = {}
        if self.url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 60}
            path = self.url.split("sqlite:///", 1)[-1] if "sqlite:///" in self.url else ""
            if path and path != ":memory:" and not read_only:
                parent = Path(path).parent
                if not parent.exists():
                    raise HarnessError(f"results store folder {parent} does not exist")
        self.engine = create_engine(self.url, **kwargs)
        if self.url.startswith("sqlite"):

            @event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_conn, _record):  # WAL lets readers run while a writer writes
                cur = dbapi_conn.cursor()
                if not read_only:
                    cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA busy_timeout=60000")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()

        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if not read_only:
            self._retry(lambda: Base.metadata.create_all(self.engine))
            self._retry(lambda: add_missing_columns(self.engine))
            self._retry(self._stamp_schema)

    def _stamp_schema(self):
        with self._sessions.begin() as s:
            row = s.get(MetaRow, "schema_version")
            if row is None:
                s.add(MetaRow(key="schema_version", value=str(SCHEMA_VERSION)))
            elif int(row.value) != SCHEMA_VERSION:
                raise HarnessError(f"{self.url} has schema version {row.value}; this harness writes {SCHEMA_VERSION}")

    # ------------------------------------------------------------------ plumbing
    @staticmethod
    def _retry(fn, attempts: int = 8):
        """Retry on SQLite 'database is locked' with backoff (several concurrent writers)."""
        for i in range(attempts):
            try:
                return fn()
            except OperationalError as exc:
                if "locked" not in str(exc).lower() and "busy" not in str(exc).lower() or i == attempts - 1:
                    raise
                time.sleep(0.05 * 2**i)

    def session(self) -> Session:
        return self._sessions()

    def _write(self, fn):
        def tx():
            with self._sessions.begin() as s:
                return fn(s)

        try:
            return self._retry(tx)
        except SQLAlchemyError as exc:
            raise HarnessError(f"results store {self.url}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc

    # ------------------------------------------------------------------ jobs
    def get_job(self, job_id: str) -> Job | None:
        with self.session() as s:
            return s.get(Job, job_id)

    def begin_job(self, job_id: str, **fields: Any) -> Job:
        """Create the job row (status running) or return the existing one for resuming."""

        def fn(s: Session):
            job = s.get(Job, job_id)
            if job is None:
                job = Job(id=job_id, status="running", created_at=utcnow(), **fields)
                s.add(job)
            elif job.status in ("failed", "skipped", "running"):
                job.status = "running"
                job.reason = None
                for k, v in fields.items():
                    setattr(job, k, v)
            return job

        return self._write(fn)

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

    def done_batches(self, job_id: str) -> set[int]:
        with self.session() as s:
            return set(s.scalars(select(BatchRow.batch).where(BatchRow.job_id == job_id)))

    def write_batch(self, job_id: str, batch: int, **payload: Any) -> None:
        """Write one finished batch atomically: a rerun either sees all of it or none.

        ``payload``: ``examples`` (list of ExampleRow field dicts), ``curves`` (attack ->
        robust counts per iteration), ``nfe``, ``seconds``, optional ``samples`` and ``extra``.
        """
        self._write(lambda s: self._add_batch(s, job_id, batch, **payload))

    @staticmethod
    def _add_batch(
        s: Session,
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
        if adv_cache is not None and s.get(AdvCacheRow, adv_cache[0]) is None:
            s.add(AdvCacheRow(key=adv_cache[0], payload=pack_adv(adv_cache[1]), created_at=utcnow()))
        if s.scalar(select(BatchRow.id).where(BatchRow.job_id == job_id, BatchRow.batch == batch)) is not None:
            return  # already written by an earlier (interrupted) run
        s.add(BatchRow(job_id=job_id, batch=batch, n=len(examples), curves=curves, nfe=nfe, seconds=seconds, extra=extra or {}))
        s.add_all(ExampleRow(job_id=job_id, batch=batch, **e) for e in examples)
        for smp in samples or []:
            s.add(SampleRow(job_id=job_id, position=smp["position"], images=encode_images(**smp["images"])))

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

        def fn(s: Session):
            for model in (ExampleRow, BatchRow, MetricRow, CurveRow, SampleRow):
                s.execute(delete(model).where(model.job_id == job_id))
            s.flush()
            for b in batches:
                self._add_batch(s, job_id, **b)
            self._finish(s, job_id, **finish)

        self._write(fn)

    def batch_rows(self, job_id: str) -> list[BatchRow]:
        with self.session() as s:
            return list(s.scalars(select(BatchRow).where(BatchRow.job_id == job_id).order_by(BatchRow.batch)))

    def example_rows(self, job_id: str) -> list[ExampleRow]:
        with self.session() as s:
            return list(s.scalars(select(ExampleRow).where(ExampleRow.job_id == job_id).order_by(ExampleRow.position)))

    def finish_job(self, job_id: str, **finish: Any) -> None:
        """Store aggregate metrics and curves, and mark the job done (one transaction)."""
        self._write(lambda s: self._finish(s, job_id, **finish))

    @staticmethod
    def _finish(
        s: Session,
        job_id: str,
        *,
        metrics: dict[str, tuple[float, float | None, float | None, int | None]],
        curves: dict[str, list[tuple[float, int]]],
        timings: dict,
        nfe: dict,
        environment: dict,
        fields: dict | None = None,
    ) -> None:
        job = s.get(Job, job_id)
        if job is None:
            raise HarnessError(f"job {job_id} vanished from the store")
        s.execute(delete(MetricRow).where(MetricRow.job_id == job_id))
        s.execute(delete(CurveRow).where(CurveRow.job_id == job_id))
        s.flush()
        for name, (value, lo, hi, n) in metrics.items():
            s.add(MetricRow(job_id=job_id, name=name, value=float(value), lower=lo, upper=hi, n=n))
        for attack, points in curves.items():
            for it, (acc, n) in enumerate(points):
                s.add(CurveRow(job_id=job_id, attack=attack, iteration=it, accuracy=float(acc), n=int(n)))
        for k, v in (fields or {}).items():
            setattr(job, k, v)
        job.status, job.reason = "done", None
        job.timings, job.nfe, job.environment = timings, nfe, environment
        job.finished_at = utcnow()

    def metrics(self, job_id: str) -> dict[str, MetricRow]:
        with self.session() as s:
            return {m.name: m for m in s.scalars(select(MetricRow).where(MetricRow.job_id == job_id))}

    def curves(self, job_id: str) -> dict[str, list[float]]:
        with self.session() as s:
            rows = s.scalars(select(CurveRow).where(CurveRow.job_id == job_id).order_by(CurveRow.attack, CurveRow.iteration))
            out: dict[str, list[float]] = {}
            for r in rows:
                out.setdefault(r.attack, []).append(r.accuracy)
            return out

    def samples(self, job_id: str) -> list[tuple[int, dict[str, np.ndarray]]]:
        with self.session() as s:
            rows = s.scalars(select(SampleRow).where(SampleRow.job_id == job_id).order_by(SampleRow.position))
            return [(r.position, decode_images(r.images)) for r in rows]

    def jobs(self, status: str | None = None) -> list[Job]:
        with self.session() as s:
            q = select(Job).order_by(Job.created_at)
            if status:
                q = q.where(Job.status == status)
            return list(s.scalars(q))

    def results_table(self, status: str | None = "done") -> list[dict[str, Any]]:
        """One flat dict per job with its headline metrics (for ``harness results``)."""
        out = []
        with self.session() as s:
            q = select(Job).order_by(Job.created_at)
            if status:
                q = q.where(Job.status == status)
            jobs = list(s.scalars(q))
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
            }
            for extra in ("psnr_clean", "ssim_clean", "psnr_adv", "ssim_adv", "detection_auc"):
                if extra in ms:
                    row[extra] = ms[extra].value
            if j.reason:
                row["reason"] = j.reason
            out.append(row)
        return out
