"""One job lifecycle, shared by ``harness run`` and ``harness grid``: begin, write batches, finish or fail.

:class:`JobWriter` owns a job's rows in the store. A job already finished is reused
unless forced. A forced rerun of a finished job keeps every new batch in memory and
swaps the old rows for the new ones in one transaction only when the new run has
finished, so a rerun killed half-way loses nothing. Any other job is written batch by
batch as each finishes, so an interrupted job resumes where it stopped; aggregate
metrics are always computed from the per-example rows, so a resumed job and an
uninterrupted one agree.

:func:`iter_batches` is the part that runs on a worker (a local process, a Ray task):
it yields ``(batch index, payload)`` for whoever owns the store.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from harness.core.defense import GradientPath
from harness.core.env import environment
from harness.core.numerics import no_tf32
from harness.core.registry import HarnessError
from harness.evaluation.aggregate import aggregate
from harness.evaluation.batch import adv_cache_key, run_batch
from harness.evaluation.resolve import ResolvedJob, RunConfig, resolve
from harness.store import Store


@dataclass
class JobOutcome:
    """A finished (or reused) job as the CLI and the Python API report it."""

    job_id: str
    status: str
    reused: bool
    summary: dict
    metrics: dict[str, dict[str, Any]]
    curves: dict[str, list[float]]
    timings: dict
    stored_path: str | None = None
    flags: list | None = None

    def as_json(self) -> dict[str, Any]:
        """The ``harness run --json`` object."""
        m = self.metrics
        out = {
            "job_id": self.job_id,
            "status": self.status,
            "reused": self.reused,
            **{k: self.summary[k] for k in ("defense", "threat", "dataset", "classifier", "n_examples")},
            "clean_accuracy": m.get("clean_accuracy", {}).get("value"),
            "robust_accuracy": m.get("robust_accuracy", {}).get("value"),
            "robust_accuracy_ci95": [m["robust_accuracy"]["lower"], m["robust_accuracy"]["upper"]] if "robust_accuracy" in m else None,
            "gradient_path": self.stored_path or self.summary["stored_gradient_path"],
            "also_paths": self.summary["also_paths"],
            "attacks": self.summary["attacks"],
            "eot_samples": self.summary["eot_samples"],
            "eval_draws": self.summary["eval_draws"],
            "scoring": self.summary["threat_spec"]["scoring"],
            "metrics": {k: v["value"] for k, v in m.items()},
            "timings": self.timings,
        }
        if "detection_auc" in m:
            out["detection_auc"] = m["detection_auc"]["value"]
        out["flags"] = self.flags
        return out


def job_fields(job: ResolvedJob) -> dict[str, Any]:
    """The ``jobs`` row columns of a resolved job."""
    return dict(
        defense=job.defense.name, threat=job.spec.name, dataset=job.cfg.dataset, classifier=job.classifier.name,
        seed=job.cfg.seed, n_examples=int(len(job.subset.y)), norm=job.spec.norm, eps=job.spec.eps,
        gradient_path=job.plan.paths_label(), eot_samples=job.eot, eval_draws=job.draws, stochastic=job.defense.stochastic,
        adaptive=job.path not in (GradientPath.CLASSIFIER, GradientPath.BPDA),
        identity=job.identity, config=job.summary(),
    )


def outcome(store: Store, job: ResolvedJob, reused: bool) -> JobOutcome:
    """Read a stored job back as a :class:`JobOutcome`."""
    row = store.get_job(job.job_id)
    metrics = {k: {"value": m.value, "lower": m.lower, "upper": m.upper, "n": m.n} for k, m in store.metrics(job.job_id).items()}
    return JobOutcome(job.job_id, row.status, reused, job.summary(), metrics, store.curves(job.job_id), row.timings or {},
                      row.gradient_path, row.flags)


class _Row:
    """Attribute view of an in-memory row, so :func:`aggregate` reads payloads like stored rows."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


class JobWriter:
    """The begin / write-batch / finish / fail sequence of one job (see the module docstring)."""

    def __init__(self, store: Store, job: ResolvedJob, *, force: bool = False):
        self.store, self.job, self.force = store, job, force
        # a forced rerun of a finished job keeps its rows in memory until it finishes (the one case that reads
        # the status here; a grid's ordinary job does not)
        self.in_memory = force and store.job_status(job.job_id) == "done"
        self._fields: dict | None = None
        self.buffer: list[dict] = []
        self.resumed = 0
        self.t_start = time.perf_counter()
        #: where the batches ran, as the worker that ran them saw it (a grid's worker process or Ray task);
        #: None: this process (``harness run``)
        self.environment: dict | None = None
        self.metrics: dict | None = None  # after finish: the stored metrics
        #: the job's last batch, held until finish writes it with the job's metrics in one transaction (it
        #: arrives just before the job ends; an interrupt writes it at once (flush), a SIGKILL in between
        #: leaves that one batch to recompute on resuming)
        self.pending: tuple[int, dict] | None = None

    @property
    def reusable(self) -> bool:
        """The job is stored as done and not forced: its stored numbers are the result (read now)."""
        return not self.force and self.store.job_status(self.job.job_id) == "done"

    @property
    def fields(self) -> dict:
        """The job's columns (:func:`job_fields`), computed once."""
        if self._fields is None:
            self._fields = job_fields(self.job)
        return self._fields

    def begin(self) -> set[int]:
        """Mark the job running (unless it is a forced rerun of a finished one); return the
        batches already stored (to skip).
        """
        self.t_start = time.perf_counter()
        if self.in_memory:
            return set()
        done = self.store.start_job(self.job.job_id, **self.fields)
        self.resumed = len(done)
        return done

    def write(self, b: int, payload: dict) -> None:
        """Keep one finished batch (in the store, or in memory for a forced rerun)."""
        if self.in_memory:
            self.buffer.append({"batch": b, **payload})
        elif b == n_batches(self.job) - 1:
            self.pending = (b, payload)
        else:
            self.store.write_batch(self.job.job_id, b, **payload)

    def finish(self) -> None:
        """Aggregate the rows and mark the job done (swapping in a forced rerun's rows).

        The held last batch, the reading of every row, the aggregation and the job's metrics
        are one write transaction: the job is stored done with all its batches, or not at all.
        """
        if self.in_memory:
            examples = [_Row(**e) for bt in self.buffer for e in bt["examples"]]
            batches = [_Row(batch=bt["batch"], n=len(bt["examples"]), curves=bt["curves"], nfe=bt["nfe"], seconds=bt["seconds"],
                            extra=bt.get("extra") or {}) for bt in self.buffer]
            self.store.replace_job(self.job.job_id, self.buffer, **self._finished(examples, batches))
        else:
            batch = None if self.pending is None else {"batch": self.pending[0], **self.pending[1]}
            self.store.complete_job(self.job.job_id, batch, self._finished)
            self.pending = None

    def _finished(self, examples: list, batches: list) -> dict:
        """The job's aggregate (metrics, curves, timings, ...) from all its rows, as :meth:`Store.finish_job` takes it."""
        job = self.job
        n = len(job.subset.y)
        if len(examples) != n or len({e.position for e in examples}) != n:
            raise HarnessError(f"job {job.job_id[:12]}: {len(examples)} stored examples, expected {n}")
        agg = aggregate(job, examples, batches)
        batch_seconds = sum(b.seconds for b in batches)
        timings = {
            "total_s": batch_seconds, "this_run_s": time.perf_counter() - self.t_start,
            "per_example_s": batch_seconds / max(n, 1), "resumed_batches": self.resumed,
        }
        payload = dict(
            metrics=agg["metrics"], curves=agg["curves"], timings=timings, nfe=agg["nfe"],
            environment=self.environment or environment(job.device),
            # the job's columns were written when it began (begin), except for a forced rerun's swap
            fields={**(self.fields if self.in_memory else {}), "flags": agg["flags"]},
        )
        self.metrics = agg["metrics"]  # name -> (value, lower, upper, n), as stored
        return payload

    def fail(self, reason: str) -> None:
        """Record a failure, keeping a held last batch (a forced rerun leaves the finished rows untouched)."""
        if self.in_memory:
            return
        try:
            self.flush()
        except HarnessError:
            pass  # the failure itself is still recorded
        self.store.fail_job(self.job.job_id, reason)

    def flush(self) -> None:
        """Write the held last batch now (an interrupted or failed job keeps every finished batch)."""
        if self.pending is not None:
            b, payload = self.pending
            self.pending = None
            self.store.write_batch(self.job.job_id, b, **payload)


def n_batches(job: ResolvedJob) -> int:
    """Number of attack batches of a job."""
    return (len(job.subset.y) + job.spec.batch_size - 1) // job.spec.batch_size


def iter_batches(
    job: ResolvedJob,
    skip: set[int] | frozenset[int] = frozenset(),
    *,
    adv_lookup: Callable[[str], dict | None] | None = None,
    progress: bool = False,
) -> Iterator[tuple[int, dict]]:
    """Run the batches of ``job`` not in ``skip``, yielding ``(batch index, payload)``.

    ``adv_lookup(key)`` returns previously computed adversarial examples for reuse.
    """
    from tqdm.auto import tqdm

    bs, n = job.spec.batch_size, len(job.subset.y)
    todo = [b for b in range(n_batches(job)) if b not in skip]
    bar = tqdm(
        total=len(todo) * job.plan.total_ticks(), disable=not progress, desc=f"{job.defense.name}/{job.spec.name}",
        unit="it", leave=False,
    )
    try:
        for b in todo:
            lo, hi = b * bs, min(n, (b + 1) * bs)
            with no_tf32():  # per batch, so that the caller's flags are its own between batches
                x = job.subset.x[lo:hi].to(job.device)
                y = job.subset.y[lo:hi].to(job.device)
                key = adv_cache_key(job, b)
                cached = adv_lookup(key) if (key is not None and adv_lookup is not None) else None
                payload = run_batch(job, b, x, y, np.arange(lo, hi), bar.update, cached_adv=cached)
            yield b, payload
    finally:
        bar.close()


_GC_FROZEN = False


def freeze_gc() -> None:
    """Once per process: move every object alive now to the garbage collector's permanent generation.

    After the imports and the first resolution the process holds a few hundred thousand
    long-lived objects (torch, SQLAlchemy, the models); the first full collection during
    a run scans them all (about 0.25 s on a loaded 2-core CPU, a tenth of a digits job).
    Frozen (``gc.freeze``), they are never scanned; what runs allocate is collected as
    before. Only the first call freezes, so a process running many jobs never pins a
    later job's garbage.
    """
    global _GC_FROZEN
    if not _GC_FROZEN:
        _GC_FROZEN = True
        gc.freeze()


def run_job(job: ResolvedJob, store: Store, *, force: bool = False, progress: bool = True) -> JobOutcome:
    """Evaluate ``job`` in this process (resuming a partial run) and store it."""
    freeze_gc()
    writer = JobWriter(store, job, force=force)
    if writer.reusable:
        return outcome(store, job, reused=True)
    done = writer.begin()
    try:
        for b, payload in iter_batches(job, done, adv_lookup=store.get_adv, progress=progress):
            writer.write(b, payload)
        writer.finish()
    except HarnessError as exc:
        writer.fail(str(exc))
        raise
    except Exception as exc:
        writer.fail(f"{type(exc).__name__}: {exc}")
        raise
    except BaseException:  # Ctrl-C, SystemExit: the job stays running with every finished batch
        writer.flush()
        raise
    return outcome(store, job, reused=False)


def evaluate(cfg: RunConfig, store: Store | None = None, *, force: bool = False, progress: bool = False) -> JobOutcome:
    """Python API: resolve and run one job (an in-memory store if none is given)."""
    store = store or Store("sqlite://")
    return run_job(resolve(cfg), store, force=force, progress=progress)
