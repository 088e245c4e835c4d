"""Executors: where a grid's jobs run. Only the parent process writes to the store.

:class:`LocalExecutor` runs one worker process per device; :class:`RayExecutor` makes
every job a Ray task that streams each finished batch back to the driver. Workers
resolve the job again on their device, check that its identity is the parent's, and
send ``("batch", job_id, b, payload)``, ``("done", ...)`` or ``("error", ...)`` events.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Iterator

from harness.core.env import environment
from harness.core.registry import HarnessError
from harness.evaluation import RunConfig, iter_batches, resolve
from harness.evaluation.lifecycle import freeze_gc
from harness.scheduler.reaper import Reaper
from harness.store import Store


@dataclasses.dataclass(frozen=True)
class Task:
    """One job for a worker: its id (to check on the worker), how to resolve it, batches to skip.

    ``after``: the job whose shareable adversarial examples (preprocessor-blind: they do not
    depend on the defense) this one reuses; it starts only when that job has ended, so that
    workers starting together never compute the same attack twice.
    """

    job_id: str
    cfg: RunConfig
    skip: tuple[int, ...] = ()
    after: str | None = None


def split_held(tasks: list[Task]) -> tuple[list[Task], dict[str, list[Task]]]:
    """The tasks to start now, and job id -> the tasks held until that job ends."""
    ready: list[Task] = []
    held: dict[str, list[Task]] = {}
    ids = {t.job_id for t in tasks}
    for t in tasks:
        if t.after is not None and t.after in ids:
            held.setdefault(t.after, []).append(t)
        else:
            ready.append(t)
    return ready, held

def _die_with_parent() -> None:
    """Linux: make a worker die when the grid process dies (even by SIGKILL)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _worker_main(device: str, tasks, results, threads: int | None, store_url: str) -> None:
    _die_with_parent()
    # Ctrl-C reaches the whole process group: the parent alone stops the grid, and ends its workers
    # with SIGTERM, on which a worker exits through its normal shutdown (no leaked semaphores)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    import torch

    if threads:
        torch.set_num_threads(threads)
    reader = Store(store_url, read_only=True)  # workers only read (the adversarial-example cache)
    while True:
        item = tasks.get()
        if item is None:
            return
        job_id, cfg, skip = item
        try:
            job = resolve(dataclasses.replace(cfg, device=device))
            freeze_gc()
            if job.job_id != job_id:
                raise HarnessError(
                    f"job identity differs on worker {device} ({job.job_id[:12]} != {job_id[:12]}): "
                    "a plugin's source file or the package versions changed after the grid started?"
                )
            for b, payload in iter_batches(job, set(skip), adv_lookup=reader.get_adv):
                results.put(("batch", job_id, b, payload))
            results.put(("env", job_id, None, environment(job.device)))
            results.put(("done", job_id, None, None))
        except Exception as exc:  # report, then keep serving other jobs
            msg = str(exc) if isinstance(exc, HarnessError) else f"{type(exc).__name__}: {exc}"
            results.put(("error", job_id, None, msg + ("" if isinstance(exc, HarnessError) else "\n" + traceback.format_exc(limit=3))))


class LocalExecutor:
    """One worker process per device in ``devices``; the parent writes every row."""

    def __init__(self, devices: list[str], threads: int | None = None):
        self.devices = devices
        self.threads = threads

    def run(self, tasks_in: list[Task], store_url: str, on_event, start=None) -> None:
        """Run every task; ``on_event(kind, job_id, batch, payload)`` gets each result in the parent.

        ``start(task) -> task``: called just before a task is queued (the grid resolves its job and marks it
        running there; None: the grid failed it, nothing to run); tasks are queued a few per worker at a time, so
        a grid of many cells keeps only the jobs in flight.
        """
        import collections
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # CUDA-safe, and no inherited sqlite connections
        tasks, results = ctx.Queue(), ctx.Queue()
        threads = self.threads or max(1, (os.cpu_count() or 1) // max(1, len(self.devices)))
        procs = [ctx.Process(target=_worker_main, args=(d, tasks, results, threads, store_url), daemon=True) for d in self.devices]
        for p in procs:
            p.start()
        ready, held = split_held(tasks_in)
        waiting = collections.deque(ready)
        window = 2 * len(procs)  # queued or running: enough that no worker waits for the parent
        pending, queued, closed = len(tasks_in), 0, False

        def feed() -> None:
            nonlocal closed, queued, pending
            while waiting and queued < window:
                t = waiting.popleft()
                started = start(t) if start is not None else t
                if started is None:  # the grid failed it before it started
                    pending -= 1
                    waiting.extend(held.pop(t.job_id, []))
                    continue
                tasks.put((started.job_id, started.cfg, list(started.skip)))
                queued += 1
            if not waiting and not held and not closed:  # nothing more to come: each worker ends after the queue
                for _ in procs:
                    tasks.put(None)
                closed = True

        feed()
        try:
            while pending:
                try:
                    kind, job_id, b, payload = results.get(timeout=5)
                except queue.Empty:
                    if not any(p.is_alive() for p in procs):
                        raise HarnessError("all grid workers died") from None
                    continue
                on_event(kind, job_id, b, payload)
                if kind in ("done", "error"):
                    pending -= 1
                    queued -= 1
                    waiting.extend(held.pop(job_id, []))
                    feed()
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                p.join(timeout=5)


#: Times a Ray job is resubmitted after its task was lost to a system failure (a node or worker that died).
RAY_RESUBMITS = 3
#: Ray tasks submitted at a time (queued in the cluster or running): the driver keeps only these jobs.
RAY_IN_FLIGHT = 256


def plugin_sources(tasks: list[Task]) -> dict[str, bytes]:
    """The plugin files the tasks import (path -> bytes), sent to every Ray task through the object store."""
    out: dict[str, bytes] = {}
    for t in tasks:
        for p in t.cfg.plugins:
            if p.endswith(".py") and p not in out and Path(p).is_file():
                out[p] = Path(p).read_bytes()
    return out


def _localise_plugins(cfg: RunConfig, sources: dict[str, bytes]) -> RunConfig:
    """``cfg`` with each plugin file this node lacks written from ``sources`` to a cache folder of the node.

    The file keeps its name and bytes, so the job identity (which hashes a plugin's source by
    file name and content) is the driver's.
    """
    import hashlib
    import tempfile

    plugins = []
    for p in cfg.plugins:
        if p in sources and not Path(p).is_file():
            data = sources[p]
            folder = Path(tempfile.gettempdir()) / "harness-plugins" / hashlib.sha256(data).hexdigest()[:16]
            folder.mkdir(parents=True, exist_ok=True)
            local = folder / Path(p).name
            if not local.is_file() or local.read_bytes() != data:
                tmp = local.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_bytes(data)
                tmp.replace(local)
            p = str(local)
        plugins.append(p)
    return dataclasses.replace(cfg, plugins=tuple(plugins))


class RayExecutor:
    """Every job is a Ray task that requests its device; batches stream back to the driver.

    Uses Ray's streaming generators, so each batch reaches the driver (which alone
    writes to the store) as soon as the task yields it. A task lost to a system failure
    (its node's raylet or its worker died) is resubmitted, at most :data:`RAY_RESUBMITS`
    times, without the batches the driver already has; Ray places it on a node that is
    alive. Each task first reports the node it runs on and, after its last batch, the
    environment it ran in (with the Ray node id); the job stores that environment, with
    the nodes of every attempt in ``environment.ray_nodes``. Plugin files reach every node
    through the object store; a weights or data file a node lacks fails the job with a
    message naming the file and the node (declare such files on a path every node shares).
    """

    def __init__(self, address: str | None, gpus_per_job: float, num_cpus: int | None = None, threads: int | None = None):
        self.address, self.gpus_per_job, self.num_cpus, self.threads = address, gpus_per_job, num_cpus, threads

    def run(self, tasks_in: list[Task], store_url: str, on_event, start=None) -> None:
        """Run every task as a Ray task; ``on_event`` gets each streamed batch on the driver.

        ``start(task) -> task``: called just before a task is first submitted (see :meth:`LocalExecutor.run`);
        at most :data:`RAY_IN_FLIGHT` tasks are submitted at a time.
        """
        import collections

        try:
            import ray
        except ImportError:
            raise HarnessError("--executor ray needs Ray: pip install 'ray==2.60.0'") from None
        started, reaper = False, None
        try:
            if not ray.is_initialized():
                kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True}
                if self.address:
                    kw["address"] = self.address
                else:  # a private cluster: the reaper ends what a killed driver would leave running
                    reaper = Reaper()
                    if self.num_cpus:
                        kw["num_cpus"] = self.num_cpus
                # workers import the harness from the same source tree as the driver
                root = str(Path(__file__).resolve().parents[2])
                env_vars = {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
                if os.environ.get("OMP_WAIT_POLICY"):  # the driver's OpenMP wait policy (passive from the CLI)
                    env_vars["OMP_WAIT_POLICY"] = os.environ["OMP_WAIT_POLICY"]
                kw["runtime_env"] = {"env_vars": env_vars}
                try:
                    ray.init(**kw)
                    started = True
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
                    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise HarnessError(f"cannot connect to {where}: {msg}") from None
                finally:
                    if reaper is not None:
                        reaper.track(force=True)
            # max_retries=0: a lost task is resubmitted here, without the batches already stored
            task = ray.remote(num_returns="streaming", max_retries=0)(_ray_job)
            sources = ray.put(plugin_sources(tasks_in))
            gens: dict[Any, Task] = {}
            got: dict[str, set[int]] = {t.job_id: set() for t in tasks_in}
            nodes: dict[str, list[str]] = {t.job_id: [] for t in tasks_in}
            lost: dict[str, int] = {}
            ready, held = split_held(tasks_in)
            waiting = collections.deque(ready)

            def feed() -> None:
                while waiting and len(gens) < RAY_IN_FLIGHT:
                    t = waiting.popleft()
                    started = start(t) if start is not None else t
                    if started is None:  # the grid failed it before it started
                        waiting.extend(held.pop(t.job_id, []))
                        continue
                    submit([started])

            def submit(ts: list[Task]) -> None:
                for t in ts:
                    opts = {"num_gpus": self.gpus_per_job, "num_cpus": 1}
                    skip = sorted(set(t.skip) | got[t.job_id])
                    ref = task.options(**opts).remote(t.job_id, t.cfg, skip, store_url, self.gpus_per_job > 0, self.threads or 1, sources)
                    gens[ref] = t

            def ended(gen, kind: str, payload: Any) -> None:
                t = gens.pop(gen)
                on_event(kind, t.job_id, None, payload)
                waiting.extend(held.pop(t.job_id, []))
                feed()

            feed()
            while gens:
                if reaper is not None:
                    reaper.track()  # task workers start as tasks are scheduled
                ready, _ = ray.wait(list(gens), num_returns=1, timeout=10)
                for gen in ready:
                    t = gens[gen]
                    try:
                        kind, b, payload = ray.get(next(gen))
                    except StopIteration:
                        ended(gen, "done", None)
                        continue
                    except ray.exceptions.RayTaskError as exc:  # the job itself raised (on whichever node)
                        cause = getattr(exc, "cause", None) or exc
                        ended(gen, "error", str(cause).splitlines()[0] if str(cause) else type(cause).__name__)
                        continue
                    except ray.exceptions.RayError as exc:  # a system failure: the task's node or worker is gone
                        lost[t.job_id] = lost.get(t.job_id, 0) + 1
                        if lost[t.job_id] > RAY_RESUBMITS:
                            ended(gen, "error", f"lost {lost[t.job_id]} times on Ray ({type(exc).__name__}): {str(exc).splitlines()[0]}")
                            continue
                        del gens[gen]
                        on_event("lost", t.job_id, None, f"{type(exc).__name__}; resubmitted without its {len(got[t.job_id])} "
                                                          "stored batches")
                        submit([t])
                        continue
                    if kind == "node":
                        nodes[t.job_id].append(payload)
                    elif kind == "env":
                        on_event("env", t.job_id, None, {**payload, "ray_nodes": list(nodes[t.job_id])})
                    else:
                        got[t.job_id].add(b)
                        on_event("batch", t.job_id, b, payload)
        finally:
            if started:
                ray.shutdown()
            if reaper is not None:
                reaper.close()


def _ray_job(job_id: str, cfg: RunConfig, skip: list[int], store_url: str, gpu: bool, threads: int = 1,
             sources: dict[str, bytes] | None = None) -> Iterator[tuple[str, int | None, Any]]:
    import ray
    import torch

    torch.set_num_threads(threads)  # a task holds one CPU (num_cpus=1): more threads only oversubscribe it
    node = ray.get_runtime_context().get_node_id()
    yield "node", None, node
    device = "cuda" if gpu else "cpu"
    try:
        job = resolve(dataclasses.replace(_localise_plugins(cfg, sources or {}), device=device))
    except HarnessError as exc:  # e.g. a weights or data file this node lacks: name the node too
        raise HarnessError(f"on Ray node {node[:12]} ({ray.util.get_node_ip_address()}): {exc}") from None
    freeze_gc()
    if job.job_id != job_id:
        raise HarnessError(
            f"job identity differs on the Ray worker ({job.job_id[:12]} != {job_id[:12]}): "
            "a plugin's source file or the package versions changed after the grid started?"
        )
    # the adversarial-example cache is read where the store is reachable: a SQLite file this node sees
    # (same machine or a shared filesystem) or a database server; elsewhere the worker computes them itself
    path = store_url.split("sqlite:///", 1)[1] if store_url.startswith("sqlite:///") else None
    reader = None
    if (path and Path(path).is_file()) or not store_url.startswith("sqlite"):
        try:
            reader = Store(store_url, read_only=True)
        except HarnessError:
            reader = None
    for b, payload in iter_batches(job, set(skip), adv_lookup=reader.get_adv if reader else None):
        yield "batch", b, payload
    yield "env", None, {**environment(job.device), "ray_node_id": node, "ray_node_ip": ray.util.get_node_ip_address()}
