"""Running a grid: plan the cells, record the skipped ones, run the rest through one executor.

Every job goes through :class:`harness.evaluation.JobWriter`, the same begin / write /
finish / fail sequence as ``harness run``: a forced rerun of a finished cell keeps its
new batches in the parent's memory and swaps the stored rows only when it has
finished, so a grid killed during ``--force`` keeps the old results.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from harness.core.registry import HarnessError, suggest
from harness.evaluation import JobWriter, resolve
from harness.evaluation.cost import large_plan_note
from harness.evaluation.resolve import sharing_networks
from harness.evaluation.lifecycle import freeze_gc
from harness.scheduler.cells import Cell, plan
from harness.scheduler.executors import LocalExecutor, RayExecutor, Task
from harness.scheduler.gridfile import GridSpec
from harness.store import Store


@dataclass
class GridSummary:
    """Every cell of a grid with its final state."""

    cells: list[Cell] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """State -> number of cells."""
        out: dict[str, int] = {}
        for c in self.cells:
            out[c.state] = out.get(c.state, 0) + 1
        return out


def _record_skips(cells: list[Cell], store: Store, log) -> None:
    for c in cells:
        if c.state == "skipped":
            log(f"  skipped {c.label()}: {c.reason}")
            store.record_skip(
                c.job_id, c.reason or "", defense=c.cfg.defense, threat=c.cfg.threat, dataset=c.cfg.dataset,
                classifier=c.cfg.classifier or "default", seed=c.cfg.seed, n_examples=c.cfg.n_examples or 0,
                identity={"run_config": dataclasses.asdict(c.cfg)}, config={"run_config": dataclasses.asdict(c.cfg)},
            )


def _leaders(todo: list[Cell], store: Store) -> list[str | None]:
    """Per pending cell, the earlier cell whose adversarial examples it will reuse (None: it computes its own).

    Cells whose attack does not depend on the defense (:func:`adv_cache_key`, e.g. every
    defense under preprocessor-blind on one dataset) share one attack: the first of them
    runs it, the others start when it has ended and read its examples from the store,
    however many workers there are. Already cached examples need no leader.
    """
    first: dict[str, str] = {}
    cached: dict[str, bool] = {}
    out: list[str | None] = []
    for c in todo:
        key = c.adv_key
        if key is not None and key not in cached:
            cached[key] = store.get_adv(key) is not None
        if key is None or cached[key]:
            out.append(None)
            continue
        out.append(first.get(key))
        first.setdefault(key, c.job_id)
    return out


def _executor(executor: str, devices: list[str] | None, address: str | None, ray_cpus: int | None, threads: int | None):
    if threads is not None and threads < 1:
        raise HarnessError(f"--threads {threads} is out of range (must be >= 1)")
    if executor == "local":
        return LocalExecutor(devices or ["cpu"], threads)
    if executor == "ray":
        gpu = any(d.startswith("cuda") for d in (devices or []))
        return RayExecutor(address, 1.0 if gpu else 0.0, ray_cpus, threads)
    raise HarnessError(f"unknown executor '{executor}'{suggest(executor, ['local', 'ray'])} (local or ray)")


def run_grid(
    spec: GridSpec,
    store: Store | None,
    *,
    executor: str | Any = "local",
    devices: list[str] | None = None,
    address: str | None = None,
    ray_cpus: int | None = None,
    threads: int | None = None,
    force: bool = False,
    dry_run: bool = False,
    log=print,
    cells: list[Cell] | None = None,
) -> GridSummary:
    """Plan ``spec`` against ``store`` and run every pending cell (see the module docstring).

    A mistake in the grid raises GridError before anything runs or is stored. ``cells``:
    the cells :func:`~harness.scheduler.cells.plan` already gave (planned against a
    read-only view of the store, say). ``dry_run`` only plans (``store`` may then be None).
    ``executor``: ``local``, ``ray``, or an object with the executors' ``run`` method.

    The parent keeps no resolved job per cell: each pending job is resolved again (on the
    CPU, its networks shared with the other jobs in flight) when it is handed to a worker,
    and dropped when it has finished, so the parent's memory does not grow with the grid.
    """
    cells = [c.light() for c in cells] if cells is not None else plan(spec, store, force=force, with_jobs=False)
    summary = GridSummary(cells)
    if dry_run:
        return summary
    if store is None:
        raise HarnessError("run_grid needs a store unless dry_run")
    run = _executor(executor, devices, address, ray_cpus, threads) if isinstance(executor, str) else executor
    freeze_gc()
    _record_skips(cells, store, log)
    todo = [c for c in cells if c.state == "pending"]
    by_id = {c.job_id: c for c in todo}
    writers: dict[str, JobWriter] = {}  # the jobs in flight only
    leaders = _leaders(todo, store)
    tasks = [Task(c.job_id, c.cfg, after=lead) for c, lead in zip(todo, leaders, strict=True)]

    def start(t: Task) -> Task | None:
        """Just before a task is handed to a worker: resolve its job here, mark it running, skip its stored batches.
        None: the job cannot be resolved here any more (a file planning read has gone): recorded as failed.
        """
        cell = by_id[t.job_id]
        try:
            job = resolve(dataclasses.replace(cell.cfg, device="cpu"))
        except HarnessError as exc:
            cell.state, cell.reason = "failed", f"when it was started: {exc}"
            _record_skips([dataclasses.replace(cell, state="skipped")], store, lambda *_: None)
            store.fail_job(t.job_id, cell.reason)
            log(f"  FAILED  {cell.label()}: {cell.reason}")
            return None
        note = large_plan_note(job)  # its network evaluations, before it starts (no calibration in the parent)
        if note:
            log(f"  start   {by_id[t.job_id].label()}: {note}")
        writers[t.job_id] = writer = JobWriter(store, job, force=force)
        return dataclasses.replace(t, skip=tuple(sorted(writer.begin())))

    def on_event(kind: str, job_id: str, b: int | None, payload: Any) -> None:
        cell, writer = by_id[job_id], writers[job_id]
        if kind == "batch":
            writer.write(b, payload)
            return
        if kind == "env":  # where the worker ran the batches: stored with the job when it finishes
            writer.environment = payload
            return
        if kind == "lost":  # a Ray task lost with its node; it runs again elsewhere
            log(f"  lost    {cell.label()}: {payload}")
            return
        del writers[job_id]  # done or failed: the job leaves the parent's memory
        if kind == "done":
            try:
                writer.finish()
                cell.state = "ran"
                m = writer.metrics
                log(f"  done    {cell.label()}: clean {m['clean_accuracy'][0]:.3f} robust {m['robust_accuracy'][0]:.3f}")
                return
            except HarnessError as exc:
                payload = str(exc)
        cell.state, cell.reason = "failed", payload
        writer.fail(str(payload))
        log(f"  FAILED  {cell.label()}: {str(payload).splitlines()[0]}")

    if tasks:
        with sharing_networks():  # jobs in flight in the parent share their networks (it never runs them)
            try:
                run.run(tasks, store.url, on_event, start=start)
            finally:  # interrupted (Ctrl-C, SIGTERM) or failed: the jobs in flight keep every finished batch
                for job_id, writer in writers.items():
                    try:
                        writer.flush()
                    except HarnessError as exc:  # never hides why the grid stopped
                        log(f"  could not keep the last batch of {by_id[job_id].label()}: {exc}")
    return summary
