"""Merging results stores (``harness merge SRC... --into DB``): many machines' stores into one, keyed by job identity.

A job's id is the sha256 of its identity (:mod:`harness.store.schema`), so the same id on
two machines is the same evaluation. Per job id:

- **finished** (``done``) in a source and absent from the target, or there only
  unfinished (``running``, ``failed``, ``skipped``): copied, every row of it (the job,
  its batches, per-example rows, metrics, curves and sample images), replacing the
  target's unfinished rows;
- finished in both with the **same numbers** (every per-example row, metric with its
  interval, and curve point, compared exactly): deduplicated, the target keeps its copy;
- finished in both with **different numbers**: refused. The merge stops before it writes
  anything, naming the job and both stores that hold it (the target, or the earlier
  source of the same merge). The cost counters, timings and environment are not
  compared: they say where and how fast a job ran, not what it measured;
- **unfinished** in a source: copied (with the batches it has, so the target resumes it)
  only when no store of the merge has it finished and the target lacks it.

Adversarial-example cache entries are copied when the target lacks their key (entries
under one key hold the same examples). Sources are opened read-only and never written;
each job is copied in one transaction, so an interrupted merge leaves whole jobs only and
can simply be run again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from sqlalchemy import JSON, delete, insert, inspect, select
from sqlalchemy.engine import Connection

from harness.core.registry import HarnessError
from harness.store.schema import AdvCacheRow, BatchRow, CurveRow, ExampleRow, Job, MetricRow, SampleRow
from harness.store.store import Store, _bulk_insert, display_url, open_existing, resolve_url, sqlite_file

#: The tables holding a job's rows, in the order they are written (the job row first).
JOB_TABLES = (Job, BatchRow, ExampleRow, MetricRow, CurveRow, SampleRow)
#: What a job measured, compared between copies of one job: table -> the columns left out, the ordering.
NUMBERS = {ExampleRow: (("id",), "position"), MetricRow: (("id",), "name"), CurveRow: (("id",), ("attack", "iteration"))}


@dataclass
class MergeSummary:
    """What a merge did, per source: jobs copied, found identical, left (unfinished elsewhere), cache entries copied."""

    into: str
    per_source: dict[str, dict[str, int]] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """One line per source, then the total."""
        out = []
        for src, c in self.per_source.items():
            out.append(f"  {src}: {c['copied']} copied, {c['identical']} identical (kept once), {c['left']} unfinished left "
                       f"(finished elsewhere or already in the target), {c['adv_cache']} adversarial-cache entries copied")
        total = sum(c["copied"] for c in self.per_source.values())
        out.append(f"merged {len(self.per_source)} store(s) into {self.into}: {total} jobs copied")
        return out


def _same_store(a: str, b: str) -> bool:
    pa, pb = sqlite_file(resolve_url(a)), sqlite_file(resolve_url(b))
    if pa is not None and pb is not None:
        return pa.resolve() == pb.resolve()
    return resolve_url(a) == resolve_url(b)


def _columns(conn: Connection, model) -> list:
    """The model's columns this store's table has (an older store lacks the migrated ones: they read as None)."""
    have = {c["name"] for c in inspect(conn).get_columns(model.__tablename__)}
    return [c for c in model.__table__.columns if c.name in have]


def _rows(conn: Connection, model, job_id: str, leave_out: tuple[str, ...] = ("id",), order: Any = "id",
          sql_null: bool = False) -> list[dict]:
    """Every row of ``model`` for ``job_id`` as a dict of decoded values (``leave_out`` dropped), in ``order``.

    ``sql_null``: a JSON column that is SQL NULL is left out of its row's dict, and one holding JSON
    ``null`` reads None, so that writing the dicts back stores each as it was (what the store's own
    writes do: see ``harness.store.store._bulk_insert``); a column the store lacks is left out too.
    """
    t = model.__table__
    cols = [c for c in _columns(conn, model) if c.name not in leave_out]
    key = t.c.id if model is Job else t.c.job_id
    order_by = [t.c[o] for o in ((order,) if isinstance(order, str) else order)]
    json_cols = [c for c in cols if isinstance(c.type, JSON)] if sql_null else []
    nulls = [c.is_(None).label(f"__null__{c.name}") for c in json_cols]
    rows = conn.execute(select(*cols, *nulls).where(key == job_id).order_by(*order_by)).mappings().all()
    if sql_null:
        return [{k: v for k, v in r.items() if not k.startswith("__null__") and not r.get(f"__null__{k}")} for r in rows]
    missing = [c.name for c in t.columns if c.name not in leave_out and c.name not in {x.name for x in cols}]
    return [{**dict(r), **dict.fromkeys(missing)} for r in rows]


def fingerprint(conn: Connection, job_id: str) -> str:
    """sha256 of what a job measured: its per-example rows, metrics and curves (see :data:`NUMBERS`)."""
    h = hashlib.sha256()
    for model, (leave_out, order) in NUMBERS.items():
        rows = _rows(conn, model, job_id, leave_out, order)
        h.update(model.__tablename__.encode())
        h.update(json.dumps(rows, sort_keys=True, default=repr).encode())  # floats by repr: exact
    return h.hexdigest()


def _statuses(conn: Connection) -> dict[str, str]:
    t = Job.__table__
    return dict(conn.execute(select(t.c.id, t.c.status)).all())


def _copy_job(src: Connection, s, job_id: str) -> None:
    """Write every row of ``job_id`` from the source connection into the target session, replacing the target's."""
    for model in reversed(JOB_TABLES):
        t = model.__table__
        s.execute(delete(t).where((t.c.id if model is Job else t.c.job_id) == job_id))
    for model in JOB_TABLES:
        _bulk_insert(s, model, _rows(src, model, job_id, () if model is Job else ("id",), sql_null=True))


def merge(sources: list[str], into: str, *, log: Callable[[str], None] = print) -> MergeSummary:
    """Merge the stores ``sources`` (paths or URLs, read-only) into ``into`` (created if missing); see the module docstring.

    Raises:
        HarnessError: a source is the target, a source is missing or not a store, or one job id holds
            different numbers in two stores (nothing is written then).
    """
    if not sources:
        raise HarnessError("harness merge needs at least one source store")
    for src in sources:
        if _same_store(src, into):
            raise HarnessError(f"source {display_url(src)} is the target store itself (--into): sources are never written")
    readers = {display_url(src): Store(src, read_only=True) for src in sources}
    shown_into = display_url(into)
    plan_on = open_existing(into)  # the target is planned against read-only (or as empty): a refused merge creates nothing
    target: Store | None = None
    try:
        with contextlib.ExitStack() as stack:
            tconn = stack.enter_context(plan_on.engine.connect()) if plan_on is not None else None
            have = _statuses(tconn) if tconn is not None else {}
            # where each finished job's numbers are now: (store label, fingerprint); the target's first
            origin: dict[str, tuple[str, str | None]] = {j: (f"the target {shown_into}", None) for j, st in have.items() if st == "done"}
            plan: dict[str, list[tuple[str, str]]] = {label: [] for label in readers}  # label -> [(job id, action)]
            for label, reader in readers.items():
                with reader.engine.connect() as sconn:
                    for job_id, status in sorted(_statuses(sconn).items()):
                        if status != "done":
                            continue
                        if job_id not in origin:
                            origin[job_id] = (label, None)
                            plan[label].append((job_id, "copy"))
                            continue
                        where, fp = origin[job_id]
                        if fp is None:  # the numbers already there: fingerprint them once
                            if where.startswith("the target"):
                                fp = fingerprint(tconn, job_id)
                            else:
                                with readers[where].engine.connect() as oconn:
                                    fp = fingerprint(oconn, job_id)
                            origin[job_id] = (where, fp)
                        if fingerprint(sconn, job_id) != fp:
                            raise HarnessError(
                                f"job {job_id[:12]} has different stored numbers in {label} and in {where}: refusing to merge "
                                "(nothing was written; `harness compare` on each store shows the rows)")
                        plan[label].append((job_id, "identical"))
            # unfinished jobs: only where no store of the merge has them finished and the target lacks them
            claimed = set(have)
            for label, reader in readers.items():
                with reader.engine.connect() as sconn:
                    for job_id, status in sorted(_statuses(sconn).items()):
                        if status == "done":
                            continue
                        if job_id in origin or job_id in claimed:
                            plan[label].append((job_id, "left"))
                        else:
                            claimed.add(job_id)
                            plan[label].append((job_id, "copy"))
        if plan_on is not None:
            plan_on.close()
        target = Store(into)
        summary = MergeSummary(shown_into)
        for label, reader in readers.items():
            counts = {"copied": 0, "identical": 0, "left": 0, "adv_cache": 0}
            with reader.engine.connect() as sconn:
                for job_id, action in plan[label]:
                    if action == "copy":
                        target._write(lambda s, j=job_id: _copy_job(sconn, s, j))  # one job, one transaction
                        counts["copied"] += 1
                    else:
                        counts[action] += 1
                counts["adv_cache"] = _copy_adv_cache(sconn, target)
            summary.per_source[label] = counts
            log(summary.lines()[len(summary.per_source) - 1])
        return summary
    finally:
        for r in readers.values():
            r.close()
        if target is not None:
            target.close()


def _copy_adv_cache(src: Connection, target: Store) -> int:
    """Copy the source's adversarial-cache entries whose key the target lacks; returns how many."""
    t = AdvCacheRow.__table__
    with target.engine.connect() as tconn:
        have = set(tconn.execute(select(t.c.key)).scalars())
    keys = [k for k in src.execute(select(t.c.key).order_by(t.c.key)).scalars() if k not in have]
    for k in keys:
        row = dict(src.execute(select(t).where(t.c.key == k)).mappings().one())

        def fn(s, row=row):
            if s.get(AdvCacheRow, row["key"]) is None:  # under the write lock: another writer may have added it
                s.execute(insert(t), [row])

        target._write(fn)
    return len(keys)
